"""UniPC: the step function against the scan, the corrector, known special cases (DDIM,
DPM-Solver++(2M)), dtypes, guidance, compile-once, bad input. Parity with diffusers:
tests/parity/test_unipc_parity.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import diffusion as D
from jaxdiff.samplers import classifier_free_guidance, dpm_solver_sample, get_sampler
from jaxdiff.samplers.unipc import (
    UniPCState,
    unipc_init,
    unipc_orders,
    unipc_sample,
    unipc_step,
    unipc_timesteps,
)
from jaxdiff.schedules import make_schedule

SCHED = make_schedule("linear", 1000)
SHAPE = (2, 4, 4, 3)


def model(x, t):
    """An eps model near the exact one for data N(0, 0.25 I), so that samples stay O(1)."""
    abar = D.extract(SCHED.alphas_cumprod, t, x.ndim).astype(x.dtype)
    s = jnp.sqrt(1 - abar)
    return s * x / (0.25 * abar + 1 - abar) + 0.1 * jnp.tanh(x) * jnp.cos(t_f(t, x) / 200.0)


def t_f(t, x):
    return t.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)


def x_T():
    return jax.random.normal(jax.random.key(0), SHAPE)


def _max_diff(a, b):
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


@pytest.mark.slow
@pytest.mark.parametrize("options", [dict(), dict(solver_order=3, solver_type="bh1",
                                                  disable_corrector=(2,)),
                                     dict(solver_order=3, predict_x0=False, spacing="trailing",
                                          final_sigmas_type="sigma_min")])
def test_step_driven_by_hand_equals_the_scan(options):
    """The step function with its explicit history, in a Python loop (concrete orders), is the
    jitted sampler (traced orders)."""
    n, order = 7, options.get("solver_order", 2)
    grid = unipc_timesteps(SCHED, n, spacing=options.get("spacing", "linspace"),
                           final_sigmas_type=options.get("final_sigmas_type", "zero"))
    orders, corrects = unipc_orders(grid.sigmas, order,
                                    disable_corrector=options.get("disable_corrector", ()))
    step_kw = {k: v for k, v in options.items() if k in ("solver_type", "predict_x0")}
    x = x_T()
    state = unipc_init(x, order)
    assert isinstance(state, UniPCState)
    xs, x0s = [x], []
    for i in range(n):
        out = model(x, jnp.full((SHAPE[0],), grid.timesteps[i], jnp.int32))
        state, x, x0 = unipc_step(state, out, x, grid.sigmas[i], grid.sigmas[i + 1],
                                  order=int(orders[i]), use_corrector=bool(corrects[i]),
                                  **step_kw)
        xs.append(x)
        x0s.append(x0)
    _, want, want_x0s = jax.jit(lambda x: unipc_sample(
        model, SCHED, x, None, num_steps=n, return_trajectory=True, **options))(x_T())
    # The noise-prediction form multiplies x by alpha_t / alpha_s on each step, so float32
    # rounding (here: eager vs jitted) made at t = 999 grows up to alpha_0 / alpha_999 = 160x.
    tol = 1e-5 if options.get("predict_x0", True) else 1e-4
    assert _max_diff(np.stack(xs), want) <= tol
    # An eps model's x0 divides by sqrt(abar_t), which amplifies float32 rounding as much.
    tol = tol / np.sqrt(np.asarray(SCHED.alphas_cumprod)[grid.timesteps])
    for i in range(n):
        assert _max_diff(x0s[i], want_x0s[i]) <= tol[i], i


def test_orders_and_corrector_schedule():
    sig = np.linspace(3.0, 0.5, 7)
    orders, corrects = unipc_orders(np.append(sig, 0.0), 3, disable_corrector=[0, 4, 99])
    np.testing.assert_array_equal(orders, [1, 2, 3, 3, 3, 2, 1])
    np.testing.assert_array_equal(corrects, [False, False, True, True, True, False, True])
    orders, _ = unipc_orders(np.append(sig, 0.0), 3, lower_order_final=False)
    np.testing.assert_array_equal(orders, [1, 2, 3, 3, 3, 3, 1])  # a step to sigma = 0: order 1
    orders, _ = unipc_orders(np.append(sig, 0.2), 2, lower_order_final=False)
    np.testing.assert_array_equal(orders, [1, 2, 2, 2, 2, 2, 2])
    _, corrects = unipc_orders(np.append(sig, 0.0), 2, use_corrector=False)
    assert not corrects.any()


@pytest.mark.slow
def test_corrector_changes_the_result_and_disable_corrector_selects_steps():
    n = 8
    on = unipc_sample(model, SCHED, x_T(), num_steps=n)
    off = unipc_sample(model, SCHED, x_T(), num_steps=n, use_corrector=False)
    assert _max_diff(on, off) > 1e-3
    all_disabled = unipc_sample(model, SCHED, x_T(), num_steps=n,
                                disable_corrector=list(range(n)))
    np.testing.assert_array_equal(np.asarray(all_disabled), np.asarray(off))
    # Disabling the correction of step 3's result changes the trajectory from sample 4 on only.
    _, a, _ = unipc_sample(model, SCHED, x_T(), num_steps=n, return_trajectory=True)
    _, b, _ = unipc_sample(model, SCHED, x_T(), num_steps=n, disable_corrector=(3,),
                           return_trajectory=True)
    np.testing.assert_array_equal(np.asarray(a[:5]), np.asarray(b[:5]))
    assert _max_diff(a[5], b[5]) > 1e-4


@pytest.mark.slow
def test_special_cases_ddim_and_dpm_solver_2m():
    """Without the corrector, UniP-1 is DDIM (DPM-Solver++ order 1) and UniP-2 with bh2 is
    DPM-Solver++(2M) (midpoint): the same update in other words."""
    for order, n in ((1, 9), (2, 9), (2, 20)):
        uni = unipc_sample(model, SCHED, x_T(), num_steps=n, solver_order=order,
                           use_corrector=False, spacing="trailing")
        dpm = dpm_solver_sample(model, SCHED, x_T(), num_steps=n, solver_order=order,
                                spacing="trailing")
        assert _max_diff(uni, dpm) <= 1e-5, (order, n)


@pytest.mark.slow
def test_bf16_model_keeps_a_float32_carry():
    def bf16_model(x, t):
        return model(x, t).astype(jnp.bfloat16)

    _, xs, x0s = unipc_sample(bf16_model, SCHED, x_T(), num_steps=6, solver_order=3,
                              return_trajectory=True)
    assert xs.dtype == x0s.dtype == jnp.float32
    ref = unipc_sample(model, SCHED, x_T(), num_steps=6, solver_order=3)
    assert _max_diff(xs[-1], ref) < 0.05  # bf16 rounding of the model output only
    out = unipc_sample(model, SCHED, x_T().astype(jnp.bfloat16), num_steps=4)
    assert out.dtype == jnp.float32


@pytest.mark.slow
def test_guidance_through_classifier_free_guidance():
    labels = jnp.array([1, 2])

    def cond_model(x, t, y):
        return model(x, t) + 0.05 * y.astype(x.dtype)[:, None, None, None]

    calls = []

    def counting(x, t, y):
        calls.append(x.shape[0])
        return cond_model(x, t, y)

    @jax.jit
    def guided(w, x):
        return unipc_sample(classifier_free_guidance(counting, labels, 0, w), SCHED, x,
                            num_steps=6)

    def by_hand(x, t):
        u, c = cond_model(x, t, jnp.zeros_like(labels)), cond_model(x, t, labels)
        return u + 3.0 * (c - u)

    got = guided(3.0, x_T())
    assert calls == [2 * SHAPE[0]]  # one batched call for both branches, traced once
    assert _max_diff(got, unipc_sample(by_hand, SCHED, x_T(), num_steps=6)) <= 1e-5
    guided(1.5, x_T())
    assert len(calls) == 1  # a new scale does not recompile


@pytest.mark.slow
def test_compiles_once_for_new_inputs():
    traces = []

    @jax.jit
    def run(w, x):
        traces.append(1)
        return unipc_sample(lambda x, t: w * x, SCHED, x, num_steps=10, solver_order=3)

    run(0.1, jnp.ones((2, 3)))
    run(0.2, jnp.zeros((2, 3)))
    assert len(traces) == 1


@pytest.mark.slow
def test_registry_and_presets():
    s = get_sampler("unipc", solver_order=3, prediction_type="v")
    assert not s.stochastic
    np.testing.assert_array_equal(
        np.asarray(s(model, SCHED, x_T(), None, num_steps=6)),
        np.asarray(unipc_sample(model, SCHED, x_T(), num_steps=6, solver_order=3,
                                prediction_type="v")))
    for name, solver_type in (("unipc_bh1", "bh1"), ("unipc_bh2", "bh2")):
        got = get_sampler(name)(model, SCHED, x_T(), None, num_steps=6)
        want = unipc_sample(model, SCHED, x_T(), num_steps=6, solver_type=solver_type)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    with pytest.raises(ValueError, match="solver_type"):
        get_sampler("unipc_bh1", solver_type="bh2")


@pytest.mark.slow
def test_final_step_to_sigma_zero_is_finite():
    """Where diffusers returns NaN / inf (bh1, noise prediction, or a higher-order last step to
    sigma = 0), the last step returns the data prediction."""
    for opts in (dict(solver_type="bh1"), dict(predict_x0=False),
                 dict(solver_order=3, lower_order_final=False)):
        out, _, x0s = unipc_sample(model, SCHED, x_T(), num_steps=6, return_trajectory=True,
                                   **opts)
        assert np.isfinite(np.asarray(out)).all(), opts
        np.testing.assert_array_equal(np.asarray(out), np.asarray(x0s[-1]))
    # sigma_min after a grid ending at t = 0: the last step (h = 0) does not move (order 1
    # whatever lower_order_final says), apart from correcting its input.
    small = make_schedule("linear", 20)
    for corrector in (True, False):
        _, xs, _ = unipc_sample(model, small, x_T(), num_steps=20, spacing="trailing",
                                final_sigmas_type="sigma_min", lower_order_final=False,
                                use_corrector=corrector, return_trajectory=True)
        assert np.isfinite(np.asarray(xs)).all()
    np.testing.assert_array_equal(np.asarray(xs[-1]), np.asarray(xs[-2]))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_steps=0), "num_steps"),
        (dict(num_steps=1001), "num_steps"),
        (dict(solver_order=0), "solver_order"),
        (dict(solver_order=4), "solver_order"),
        (dict(solver_order=2.0), "solver_order"),
        (dict(solver_type="midpoint"), "solver_type"),
        (dict(predict_x0="yes"), "predict_x0"),
        (dict(prediction_type="score"), "prediction_type"),
        (dict(spacing="uniform"), "spacing"),
        (dict(final_sigmas_type="one"), "final_sigmas_type"),
        (dict(sigma_schedule="lu"), "sigma_schedule"),  # DPM-Solver's, not UniPC's
        (dict(lower_order_final=1), "lower_order_final"),
        (dict(use_corrector=None), "use_corrector"),
        (dict(disable_corrector=3), "disable_corrector"),
        (dict(disable_corrector="3"), "disable_corrector"),
        (dict(disable_corrector=[-1]), "disable_corrector"),
        (dict(disable_corrector=[1.0]), "disable_corrector"),
        (dict(clip_x0=0.0), "clip_x0"),
        (dict(clip_x0=1.0, predict_x0=False), "clip_x0"),
        (dict(steps_offset=-1, spacing="leading"), "steps_offset"),
        (dict(num_steps=1000, spacing="linspace"), "num_steps"),  # repeated timesteps
    ],
)
def test_bad_input(kwargs, match):
    kwargs = {"num_steps": 10, **kwargs}
    with pytest.raises(ValueError, match=match):
        unipc_sample(model, SCHED, x_T(), **kwargs)
    if "num_steps" not in match:
        with pytest.raises(ValueError, match=match):
            get_sampler("unipc", **{k: v for k, v in kwargs.items() if k != "num_steps"})


def test_bad_step_input():
    x = x_T()
    state = unipc_init(x, 2)
    with pytest.raises(ValueError, match="order"):
        unipc_step(state, x, x, 1.0, 0.5, order=3)
    with pytest.raises(ValueError, match="model_output"):
        unipc_step(state, x[:1], x, 1.0, 0.5, order=1)
    with pytest.raises(ValueError, match="state"):
        unipc_step(unipc_init(x[:1], 2), x, x, 1.0, 0.5, order=1)
    with pytest.raises(ValueError, match="model_fn"):
        unipc_sample(lambda x, t: x[..., :1], SCHED, x, num_steps=5)
