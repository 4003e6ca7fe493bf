"""The training loss: targets, weightings, label dropout, per-example vmap, jit and grad."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import diffusion as D
from jaxdiff.losses import diffusion_loss, drop_condition, loss_weights
from jaxdiff.schedules import make_schedule

SCHED = make_schedule("cosine", 1000)
X0 = jax.random.normal(jax.random.key(0), (4, 6, 6, 2))
T = jnp.array([0, 10, 500, 999], jnp.int32)
NOISE = jax.random.normal(jax.random.key(1), X0.shape)


def scaled_apply(params, x_t, t, cond):
    return params["w"] * x_t


@pytest.mark.parametrize("kind", ["eps", "x0", "v"])
@pytest.mark.parametrize("loss_type", ["l2", "l1"])
def test_loss_equals_numpy_reference(kind, loss_type):
    params = {"w": jnp.float32(0.3)}
    loss, aux = jax.jit(
        lambda p: diffusion_loss(
            scaled_apply, p, SCHED, X0, None, t=T, noise=NOISE, prediction_type=kind,
            loss_type=loss_type,
        )
    )(params)
    xt = np.asarray(D.q_sample(SCHED, X0, T, NOISE))
    target = {"eps": NOISE, "x0": X0, "v": D.velocity(SCHED, X0, T, NOISE)}[kind]
    err = 0.3 * xt - np.asarray(target)
    per = (err**2 if loss_type == "l2" else np.abs(err)).reshape(4, -1).mean(1)
    np.testing.assert_allclose(aux["per_example"], per, rtol=1e-5)
    np.testing.assert_allclose(loss, per.mean(), rtol=1e-5)


def test_perfect_model_has_zero_loss():
    def oracle(params, x_t, t, cond):
        return D.predict_eps_from_x0(SCHED, x_t, t, X0)

    loss, _ = diffusion_loss(oracle, None, SCHED, X0, jax.random.key(2))
    assert float(loss) < 1e-6


@pytest.mark.parametrize("kind", ["eps", "x0", "v"])
def test_min_snr_weights(kind):
    gamma = 5.0
    w = np.asarray(loss_weights(SCHED, T, prediction_type=kind, weighting="min_snr",
                                min_snr_gamma=gamma))
    s = np.asarray(D.snr(SCHED, T), np.float64)
    expected = {"eps": np.minimum(s, gamma) / s, "x0": np.minimum(s, gamma),
                "v": np.minimum(s, gamma) / (s + 1)}[kind]
    np.testing.assert_allclose(w, expected, rtol=1e-5)
    # all three weight the same x0-space error identically: w_eps * SNR == w_x0 == w_v * (SNR + 1)
    np.testing.assert_allclose(
        {"eps": w * s, "x0": w, "v": w * (s + 1)}[kind], np.minimum(s, gamma), rtol=1e-5
    )


def test_min_snr_finite_at_zero_terminal_snr():
    z = make_schedule("linear", 100, rescale_to_zero_terminal_snr=True)
    w = loss_weights(z, jnp.array([0, 99]), prediction_type="eps", weighting="min_snr")
    np.testing.assert_allclose(w, [5.0 / float(D.snr(z, jnp.array([0]))[0]), 1.0], rtol=1e-5)


@pytest.mark.slow
def test_label_dropout_replaces_by_null_label():
    labels = jnp.arange(8) % 10
    seen = []

    def apply(params, x_t, t, cond):
        seen.append(cond)
        return jnp.zeros_like(x_t)

    x0 = jnp.zeros((8, 2))
    diffusion_loss(apply, None, SCHED, x0, jax.random.key(3), labels, cond_drop_prob=1.0,
                   null_cond=10)
    np.testing.assert_array_equal(seen[-1], 10)
    diffusion_loss(apply, None, SCHED, x0, jax.random.key(3), labels, cond_drop_prob=0.0)
    np.testing.assert_array_equal(seen[-1], labels)
    # about half dropped at p = 0.5, over a large batch
    big = jnp.arange(4000) % 10
    diffusion_loss(apply, None, SCHED, jnp.zeros((4000, 1)), jax.random.key(4), big,
                   cond_drop_prob=0.5, null_cond=10)
    frac = float(jnp.mean(seen[-1] == 10))
    assert 0.45 < frac < 0.55


def test_drop_condition_on_context_pytree():
    cond = {"labels": jnp.array([1, 2]), "context": jnp.ones((2, 3, 4))}
    null = {"labels": 10, "context": jnp.zeros((3, 4))}
    out = drop_condition(cond, null, jnp.array([True, False]))
    np.testing.assert_array_equal(out["labels"], [10, 2])
    np.testing.assert_array_equal(out["context"][0], 0.0)
    np.testing.assert_array_equal(out["context"][1], 1.0)


@pytest.mark.slow
def test_jit_grad_and_same_key_same_loss():
    params = {"w": jnp.float32(0.5)}
    f = jax.jit(lambda p, k: diffusion_loss(scaled_apply, p, SCHED, X0, k, weighting="min_snr")[0])
    assert float(f(params, jax.random.key(5))) == float(f(params, jax.random.key(5)))
    assert float(f(params, jax.random.key(5))) != float(f(params, jax.random.key(6)))
    g = jax.grad(f)(params, jax.random.key(5))
    eps = 1e-3
    fd = (f({"w": 0.5 + eps}, jax.random.key(5))
          - f({"w": 0.5 - eps}, jax.random.key(5))) / (2 * eps)
    np.testing.assert_allclose(g["w"], fd, rtol=1e-2)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prediction_type="score"), "prediction_type"),
        (dict(weighting="p2"), "weighting"),
        (dict(loss_type="huber"), "loss_type"),
        (dict(cond_drop_prob=1.5), "cond_drop_prob"),
        (dict(cond_drop_prob=0.1), "null_cond"),
        (dict(weighting="min_snr", min_snr_gamma=0.0), "min_snr_gamma"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        diffusion_loss(scaled_apply, {"w": 1.0}, SCHED, X0, jax.random.key(0), **kwargs)


def test_missing_key_and_wrong_model_output():
    with pytest.raises(ValueError, match="key"):
        diffusion_loss(scaled_apply, {"w": 1.0}, SCHED, X0, None)
    with pytest.raises(ValueError, match="apply_fn"):
        diffusion_loss(lambda p, x, t, c: x[..., :1], None, SCHED, X0, jax.random.key(0))
    with pytest.raises(ValueError, match="noise"):
        diffusion_loss(scaled_apply, {"w": 1.0}, SCHED, X0, None, t=T, noise=NOISE[:2])


def test_traced_cond_drop_prob():
    """A traced cond_drop_prob (e.g. annealed under jit) draws the same mask as the concrete value;
    without null_cond, or not a scalar, it raises a ValueError naming it (it used to be a tracer
    error)."""
    labels = jnp.arange(8) % 10
    x0, zeros, key = jnp.zeros((8, 2)), jnp.zeros((8, 2)), jax.random.key(3)

    def apply(params, x_t, t, cond):  # per-example loss 1 where the label was dropped, else 0
        return jnp.broadcast_to((cond == 10).astype(x_t.dtype)[:, None], x_t.shape)

    def dropped(p):
        return diffusion_loss(apply, None, SCHED, x0, key, labels, cond_drop_prob=p,
                              null_cond=10, noise=zeros)[1]["per_example"]

    traced = jax.jit(dropped)
    np.testing.assert_array_equal(traced(1.0), 1.0)
    np.testing.assert_array_equal(traced(0.0), 0.0)
    np.testing.assert_array_equal(traced(0.5), dropped(0.5))
    assert 0 < float(jnp.sum(dropped(0.5))) < 8
    with pytest.raises(ValueError, match="cond_drop_prob"):
        jax.jit(lambda p: diffusion_loss(apply, None, SCHED, x0, key, labels,
                                         cond_drop_prob=p)[0])(0.1)
    with pytest.raises(ValueError, match="cond_drop_prob must be a scalar"):
        dropped(jnp.full((8,), 0.5))
