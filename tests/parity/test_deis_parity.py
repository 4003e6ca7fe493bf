"""DEIS against diffusers 0.42's ``DEISMultistepScheduler``: grids, trajectories (orders 1-3, eps
/ v / x0, every sigma schedule), image-to-image, the config import and export, and a tiny Stable
Diffusion folder that ships the scheduler.

Trajectories: both sides run the analytic stand-in model of test_sampler_parity.py on the same
float32 ``alphas_cumprod`` (jaxdiff's, patched into the scheduler before ``set_timesteps``, as
test_dpmpp_parity.py does); jaxdiff's options come from the config import
(:func:`jaxdiff.convert.sampler_options_from_diffusers_config`), so the mapping is tested with the
arithmetic. diffusers is run twice: in float32, and in float64 on the same grid (its float32
sigmas widened, the stand-in in float64), which is the exact DEIS trajectory for this model up to
float64 rounding.

Tolerances are bounds on float32 rounding computed from each run's own magnitudes
(:func:`rounding_bound`), not measured values. One step ``x_t = alpha_t (x_s / alpha_s +
sum_j c_j eps_j)`` rounds ``x_s / alpha_s`` and each ``c_j eps_j`` (and the model's eps, and its
conversion) to float32, so it errs by at most a few ulps of ``alpha_t / alpha_s |x|`` and of
``alpha_t |c_j| |eps|``; the stand-in is (nearly) the exact denoiser of data ``N(0, 0.25 I)``,
whose probability-flow map ``x_s -> x_t`` scales by ``std_t / std_s`` in ``[1/2, 2]``, so earlier
steps' errors are carried, not grown, and the step errors add. With ``U = 2**-23`` (one ulp at 1)
the bound is ``8 U sum_steps (alpha_t / alpha_s X + alpha_t sum_j |c_j| E)``, ``X`` / ``E`` the
largest ``|x|`` / ``|eps|`` of the run: 4 ulps per term (its roundings and the 1-2 ulp
``log`` / ``sqrt`` / ``exp`` of torch and XLA) times the factor 2 of the flow. jaxdiff must lie
within it of the float64 run. diffusers' float32 run is further away: it computes each
coefficient as a difference of two antiderivative values ``ind(rho_t) - ind(rho_s)``, each up to
``1 / (log rho_s - log rho_1)^k`` times larger than the coefficient (``k`` = order - 1), so its
bound adds 8 ulps of ``alpha_t (|ind(rho_t)| + |ind(rho_s)|) E`` per term (the terms of each
antiderivative taken in absolute value). jaxdiff's formula has no such cancellation (module
docstring of :mod:`jaxdiff.samplers.deis`). Every case also asserts that jaxdiff is within a
third of its bound (the >= 3x margin), and prints the measured errors.
"""

import inspect
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DEISMultistepScheduler

from jaxdiff.convert import (
    ignored_config_keys,
    sampler_from_diffusers_config,
    sampler_options_from_diffusers_config,
    schedule_from_diffusers_config,
    scheduler_to_diffusers,
)
from jaxdiff.samplers import get_sampler, noise_to_img2img, strength_start_step
from jaxdiff.samplers.deis import DEIS, deis_orders, deis_sample, deis_timesteps
from jaxdiff.schedules import make_schedule
from tests.parity.test_sampler_parity import standin
from tests.parity.tolerances import GRID_SIGMA_RTOL, train_sigma_rtol

U = 2.0**-23
SHAPE = (2, 3, 6, 6)  # NCHW on the torch side; the stand-in is elementwise
DIFFUSERS_NAME = {"linear": "linear", "scaled_linear": "scaled_linear",
                  "cosine": "squaredcos_cap_v2"}
BETAS = {"linear": {}, "scaled_linear": dict(beta_start=0.00085, beta_end=0.012), "cosine": {}}
SCHEDULES = {name: make_schedule(name, 1000, **BETAS[name]) for name in DIFFUSERS_NAME}
CLASS = "DEISMultistepScheduler"


def _ref(name, **cfg):
    """The diffusers scheduler on ``name``, with jaxdiff's float32 ``alphas_cumprod``."""
    ref = DEISMultistepScheduler(beta_schedule=DIFFUSERS_NAME[name], **BETAS[name], **cfg)
    ref.alphas_cumprod = torch.from_numpy(np.array(SCHEDULES[name].alphas_cumprod))
    return ref


def _grid(name, n, cfg):
    """``(jaxdiff's grid, the scheduler after set_timesteps, the imported options)``."""
    ref = _ref(name, **cfg)
    ref.set_timesteps(n)
    opts = sampler_options_from_diffusers_config({**ref.config, "_class_name": CLASS})
    grid = deis_timesteps(SCHEDULES[name], n, spacing=opts["spacing"],
                          steps_offset=opts["steps_offset"], sigma_schedule=opts["sigma_schedule"])
    return grid, ref, opts


# ---------------------------------------------------------------------------------------- grids

SIGMA_FLAGS = {"discrete": {}, "karras": dict(use_karras_sigmas=True),
               "exponential": dict(use_exponential_sigmas=True),
               "beta": dict(use_beta_sigmas=True)}
SPACING_CFGS = {"linspace": {}, "leading": dict(timestep_spacing="leading"),
                "leading+1": dict(timestep_spacing="leading", steps_offset=1),
                "trailing": dict(timestep_spacing="trailing")}


@pytest.mark.parametrize("name", list(DIFFUSERS_NAME))
@pytest.mark.parametrize("sigmas", list(SIGMA_FLAGS))
def test_grid_matches_set_timesteps(name, sigmas):
    """Every spacing (with and without ``steps_offset``) for each sigma schedule and training
    schedule, over step counts from 1 to 998: the timesteps equal, the sigmas within 1 ulp
    (torch's float32 ``sqrt`` is not always correctly rounded)."""
    overshoots = []
    for (sp, sp_cfg), n in itertools.product(SPACING_CFGS.items(), (1, 2, 7, 13, 50, 61, 998)):
        grid, ref, _ = _grid(name, n, {**SIGMA_FLAGS[sigmas], **sp_cfg})
        label = f"{name} {sigmas} {sp} n={n}"
        ts, sig = ref.timesteps.numpy(), ref.sigmas.numpy()
        if ts[-1] == -1:  # diffusers' float arange overshoots ("trailing"; jaxdiff drops it)
            overshoots.append((sp, n))
            ts, sig = ts[:-1], np.delete(sig, -2)
        np.testing.assert_array_equal(grid.timesteps, ts, err_msg=label)
        np.testing.assert_allclose(grid.sigmas, sig, rtol=GRID_SIGMA_RTOL, atol=0, err_msg=label)
        np.testing.assert_array_equal(grid.prev_timesteps[:-1], grid.timesteps[1:])
    if sigmas == "discrete":
        assert overshoots == [("trailing", 61), ("trailing", 998)]


def test_grid_where_diffusers_breaks():
    """``"trailing"`` with 61 steps: diffusers' float ``arange`` overshoots to a 62nd timestep,
    ``-1``; jaxdiff keeps the 61 valid ones. ``"linspace"`` with ``num_steps = T`` repeats
    timesteps (diffusers' second-order update then divides by ``log rho_s - log rho_1 = 0``):
    refused, naming ``num_steps``."""
    grid, ref, _ = _grid("linear", 61, dict(timestep_spacing="trailing"))
    assert ref.timesteps[-1] == -1 and len(ref.timesteps) == 62
    np.testing.assert_array_equal(grid.timesteps, ref.timesteps.numpy()[:-1])
    with pytest.raises(ValueError, match="num_steps=1000 repeats timesteps"):
        deis_timesteps(SCHEDULES["linear"], 1000)


# ----------------------------------------------------------------------------------- trajectories


def _antiderivatives(rho_t, rho_s, history, order):
    """diffusers' two antiderivative values per coefficient of an order-``order`` step (its
    ``ind_fn`` at ``rho_t`` and at ``rho_s``, in float64): ``[|ind_j(rho_t)| + |ind_j(rho_s)|]``,
    what the float32 subtraction ``ind_j(rho_t) - ind_j(rho_s)`` rounds."""
    L = np.log
    if order == 1:  # (alpha_t / alpha_s) x - sigma_t (e^h - 1) eps: no antiderivative
        return [0.0]
    nodes = [rho_s, *history[:order - 1]]
    out = []
    for j in range(order):
        b, others = nodes[j], [nodes[k] for k in range(order) if k != j]
        total = 0.0
        for t in (rho_t, rho_s):
            if order == 2:
                (c,) = others
                total += abs(t * (L(t) - L(c) - 1) / (L(b) - L(c)))
            else:
                c, d = others
                num = t * (L(c) * (L(d) - L(t) + 1) - L(d) * L(t) + L(d) + L(t) ** 2
                           - 2 * L(t) + 2)
                total += abs(num / ((L(b) - L(c)) * (L(b) - L(d))))
        out.append(total)
    return out


def _coefficients(rho_t, rho_s, history, order):
    """The exact (float64) DEIS coefficients of one step: the integrals over ``[rho_s, rho_t]`` of
    the Lagrange basis polynomials in ``log rho`` through ``rho_s`` and ``history``."""
    nodes = np.log([rho_s, *history[:order - 1]])
    u = np.linspace(np.log(rho_s), np.log(rho_t), 2001)  # Simpson in u: d rho = rho du
    wts = np.ones_like(u)
    wts[1:-1:2], wts[2:-1:2] = 4, 2
    out = []
    for j in range(order):
        basis = np.prod([(u - nodes[k]) / (nodes[j] - nodes[k]) for k in range(order) if k != j],
                        axis=0)
        out.append(float(np.sum(wts * basis * np.exp(u)) * (u[1] - u[0]) / 3))
    return out


def rounding_bound(sigmas, orders, start, X, E, *, diffusers):
    """The float32 rounding bound on a trajectory over ``sigmas [N + 1]`` with ``orders [N]``
    from step ``start`` (module docstring); ``X`` / ``E`` bound ``|x|`` / ``|eps|``."""
    total = 0.0
    for i in range(start, len(orders)):
        rho_s, rho_t, k = float(sigmas[i]), float(sigmas[i + 1]), int(orders[i])
        a_s, a_t = (rho_s**2 + 1) ** -0.5, (rho_t**2 + 1) ** -0.5
        history = [float(sigmas[i - 1 - j]) for j in range(k - 1)]
        coefs = [abs(c) for c in _coefficients(rho_t, rho_s, history, k)] if k > 1 else [
            abs(rho_t - rho_s)]
        step = a_t / a_s * X + a_t * sum(coefs) * E
        if diffusers:
            step += a_t * sum(_antiderivatives(rho_t, rho_s, history, k)) * E
        total += 8 * U * step
    return total


def _run(name, n, cfg, *, strength=1.0, x_T=None):
    """``(jaxdiff's trajectory, diffusers' float32 one, its float64 one, grid, orders, start, X,
    E)``; trajectories ``[M + 1, *SHAPE]`` NCHW numpy from the start step, from ``x_T`` (NCHW;
    image-to-image: the sample noised to the start step) or standard normal."""
    grid, ref, opts = _grid(name, n, cfg)
    np.testing.assert_array_equal(grid.timesteps, ref.timesteps.numpy())
    start = strength_start_step(n, strength)
    orders = deis_orders(grid.sigmas, opts["solver_order"],
                         lower_order_final=opts["lower_order_final"], start_step=start)
    pred = opts["prediction_type"]
    if x_T is None:
        x_T = np.random.default_rng(n).standard_normal(SHAPE).astype(np.float32)
    acp32 = torch.from_numpy(np.array(SCHEDULES[name].alphas_cumprod))
    trajs, X, E = [], 0.0, 0.0
    for dtype in (torch.float32, torch.float64):
        ref.set_timesteps(n)  # resets the history
        ref.set_begin_index(start)
        ref.sigmas = ref.sigmas.to(dtype)  # the float32 grid, widened for the float64 run
        acp = acp32.to(dtype)
        x = torch.from_numpy(x_T).to(dtype)
        traj = [x.numpy()]
        for t in ref.timesteps[start:]:
            tt = torch.full((x.shape[0],), int(t))
            x = ref.step(standin(torch, x, tt, acp, pred), t, x).prev_sample
            traj.append(x.numpy())
            if dtype == torch.float64:
                X = max(X, float(x.abs().max()))
                E = max(E, float(standin(torch, x, tt, acp, "eps").abs().max()))
        trajs.append(np.stack(traj))
    X = max(X, float(np.abs(x_T).max()))
    a = SCHEDULES[name].alphas_cumprod
    sample = jax.jit(lambda x: deis_sample(
        lambda x, t: standin(jnp, x, t, a, pred), SCHEDULES[name], x, num_steps=n,
        return_trajectory=True, strength=strength, **opts))
    _, traj, _ = sample(jnp.asarray(x_T.transpose(0, 2, 3, 1)))
    ours = np.asarray(traj).transpose(0, 1, 4, 2, 3)
    return ours, trajs[0], trajs[1], grid, orders, start, X, E


def _check(label, run):
    ours, ref32, ref64, grid, orders, start, X, E = run
    assert np.isfinite(ref32).all() and ours.shape == ref32.shape
    err64 = float(np.abs(ours - ref64).max())
    err32 = float(np.abs(ours - ref32).max())
    diffusers_err = float(np.abs(ref32 - ref64).max())
    tol = rounding_bound(grid.sigmas, orders, start, X, E, diffusers=False)
    tol32 = tol + rounding_bound(grid.sigmas, orders, start, X, E, diffusers=True)
    print(f"{label}: jaxdiff - float64 {err64:.2e} (bound {tol:.2e}), jaxdiff - diffusers "
          f"{err32:.2e} (bound {tol32:.2e}); diffusers - float64 {diffusers_err:.2e}")
    assert err64 <= tol / 3, (err64, tol)
    assert err32 <= tol32, (err32, tol32)
    return err64, err32


K, E_, B = SIGMA_FLAGS["karras"], SIGMA_FLAGS["exponential"], SIGMA_FLAGS["beta"]
# (id, schedule, num_steps, diffusers config): orders 1-3, eps / v / x0, every spacing and sigma
# schedule, lower_order_final both ways (it applies below 15 steps), 8 to 100 steps.
CASES = [
    ("1-linspace-eps", "linear", 10, dict(solver_order=1)),
    ("2-linspace-v-cosine", "cosine", 12, dict(prediction_type="v_prediction")),
    ("2-leading1-v-cosine", "cosine", 12,
     dict(timestep_spacing="leading", steps_offset=1, prediction_type="v_prediction")),
    ("2-karras-eps-sd", "scaled_linear", 20, dict(**K)),
    ("3-karras-eps-sd", "scaled_linear", 25, dict(solver_order=3, **K)),
    ("3-trailing-x0-short", "scaled_linear", 8,
     dict(solver_order=3, timestep_spacing="trailing", prediction_type="sample")),
    ("3-exponential-v-nolof", "linear", 14,
     dict(solver_order=3, prediction_type="v_prediction", lower_order_final=False, **E_)),
    ("3-beta-eps-sd", "scaled_linear", 15, dict(solver_order=3, **B)),
    ("3-linspace-eps-100", "scaled_linear", 100, dict(solver_order=3)),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_trajectory(case):
    """The whole trajectory, every step. Karras / exponential / beta grids repeat their last
    sigma: with >= 15 steps diffusers' last step is then of higher order with coefficients that
    are exactly 0, jaxdiff's first order with ``I_0 = 0``; both return ``alpha_t (x / alpha_s) =
    x`` there, to the rounding of the division and the product. Long
    third-order grids show diffusers' float32 cancellation (``"3-linspace-eps-100"``: its
    distance to the float64 run is ~1e3 times jaxdiff's; the float32 comparison's bound is then
    loose, the float64 one is what tests the arithmetic)."""
    case_id, name, n, cfg = case
    run = _run(name, n, cfg)
    ours, ref32, _, grid = run[:4]
    if grid.sigmas[-1] == grid.sigmas[-2]:
        assert run[4][-1] == 1
        for traj in (ours, ref32):  # x (alpha_t / alpha_s = 1): the roundings of / and *
            np.testing.assert_allclose(traj[-1], traj[-2], rtol=2 * U, atol=0)
    _check(case_id, run)


# --------------------------------------------------------------------------------- image-to-image

IMG2IMG = [("2-sd", "scaled_linear", 10, dict(), 0.6),
           ("3-karras-sd", "scaled_linear", 12, dict(solver_order=3, **K), 0.75),
           ("3-v-strength1", "linear", 8, dict(solver_order=3, prediction_type="v_prediction"),
            1.0)]


@pytest.mark.parametrize("case", IMG2IMG, ids=[c[0] for c in IMG2IMG])
def test_image_to_image(case):
    """diffusers' img2img recipe: keep ``timesteps[t_start:]`` (``t_start = N - int(N *
    strength)``), ``set_begin_index(t_start)``, ``add_noise`` at the first kept timestep, then
    the loop; the history starts empty there on both sides. The start sample matches
    :func:`~jaxdiff.samplers.noise_to_img2img` to 2 ulps of ``|x0| + |noise|``; the tail's
    trajectory is checked as the text-to-image ones."""
    case_id, name, n, cfg, strength = case
    grid, ref, opts = _grid(name, n, cfg)
    t_start = n - min(int(n * strength), n)
    rng = np.random.default_rng(1)
    x0 = rng.standard_normal(SHAPE).astype(np.float32)
    noise = rng.standard_normal(SHAPE).astype(np.float32)
    ref.set_begin_index(t_start)
    start_ref = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise),
                              ref.timesteps[t_start:t_start + 1].repeat(SHAPE[0])).numpy()
    sampler = get_sampler("deis", **opts)
    x_s = noise_to_img2img(sampler, SCHEDULES[name], n, jnp.asarray(x0), jnp.asarray(noise),
                           strength)
    bound = 2 * U * float(np.abs(x0).max() + np.abs(noise).max())
    assert np.abs(np.asarray(x_s) - start_ref).max() <= bound
    # the tail on both sides from that start sample (diffusers' scheduler from t_start)
    _check(f"img2img {case_id}", _run(name, n, cfg, strength=strength, x_T=start_ref))


# ------------------------------------------------------------------------ config import / export


def test_every_constructor_argument_is_declared():
    """Each argument of ``DEISMultistepScheduler.__init__`` is a training-schedule key or in the
    twin's defaults with diffusers' default value, and each is mapped to an option, restricted
    by ``must_be`` or declared without effect: none is silently dropped."""
    twin = DEIS.diffusers
    params = {k: p.default for k, p in inspect.signature(DEISMultistepScheduler.__init__)
              .parameters.items() if k != "self"}
    schedule_keys = {"num_train_timesteps", "beta_start", "beta_end", "beta_schedule",
                     "trained_betas"}
    for key, default in params.items():
        if key not in schedule_keys:
            assert twin.defaults[key] == default, key
    # nothing but its arguments; the schedule keys it takes (no rescale_betas_zero_snr)
    assert not set(twin.defaults) - set(params)
    assert twin.schedule_keys == schedule_keys
    read = {"solver_order", "prediction_type", "timestep_spacing", "steps_offset",
            "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
            "lower_order_final"}
    assert set(twin.defaults) == read | set(twin.must_be) | twin.no_effect
    assert DEIS.diffusers.class_name == CLASS


def test_config_import():
    """diffusers' own aliases load as DEIS (the class maps ``algorithm_type`` ``"dpmsolver"`` /
    ``"dpmsolver++"`` to ``"deis"`` and the DPM-Solver / UniPC solver types to ``"logrho"``);
    a config the class cannot run, or that jaxdiff would run differently, is refused naming the
    key."""
    base = dict(_class_name=CLASS, beta_schedule="scaled_linear", beta_start=0.00085,
                beta_end=0.012)
    s = sampler_from_diffusers_config(dict(base, solver_order=3, use_karras_sigmas=True,
                                           prediction_type="v_prediction",
                                           timestep_spacing="trailing", lower_order_final=False,
                                           _diffusers_version="0.42.1"))
    assert s.name == "deis" and not s.stochastic
    assert s.effective_options == dict(solver_order=3, prediction_type="v", spacing="trailing",
                                       steps_offset=0, sigma_schedule="karras",
                                       lower_order_final=False)
    for alias in (dict(algorithm_type="dpmsolver++", solver_type="midpoint"),
                  dict(algorithm_type="dpmsolver", solver_type="bh2")):
        assert DEISMultistepScheduler(**alias).config.algorithm_type == "deis"  # the reference
        assert sampler_from_diffusers_config(dict(base, **alias)).effective_options == \
            sampler_from_diffusers_config(base).effective_options
    for bad, match in [
        (dict(thresholding=True), "thresholding"),
        (dict(use_flow_sigmas=True), "use_flow_sigmas"),
        (dict(use_dynamic_shifting=True), "use_dynamic_shifting"),
        (dict(prediction_type="flow_prediction"), "prediction_type"),
        (dict(algorithm_type="sde-dpmsolver++"), "algorithm_type"),
        (dict(solver_type="bogus"), "solver_type"),
        (dict(use_karras_sigmas=True, use_beta_sigmas=True), "use_karras_sigmas"),
        (dict(timestep_spacing="uniform"), "spacing"),
        (dict(solver_order=4), "solver_order"),
    ]:
        with pytest.raises(ValueError, match=match):
            sampler_from_diffusers_config(dict(base, **bad))
    # Keys the class does not take are ignored, as diffusers ignores them: rescale_betas_zero_snr
    # (diffusers keeps the betas) and DPM-Solver's use_lu_lambdas.
    foreign = dict(base, rescale_betas_zero_snr=True, use_lu_lambdas=True)
    ref = DEISMultistepScheduler.from_config(foreign)
    assert float(ref.alphas_cumprod[-1]) > 1e-3
    assert ignored_config_keys(foreign) == ("rescale_betas_zero_snr", "use_lu_lambdas")
    assert sampler_from_diffusers_config(foreign).effective_options == \
        sampler_from_diffusers_config(base).effective_options
    np.testing.assert_array_equal(
        np.asarray(schedule_from_diffusers_config(foreign).alphas_cumprod),
        np.asarray(schedule_from_diffusers_config(base).alphas_cumprod))


@pytest.mark.parametrize("options,schedule", [
    (dict(), "linear"),
    (dict(solver_order=3, sigma_schedule="karras", prediction_type="v"), "scaled_linear"),
    (dict(solver_order=1, spacing="leading", steps_offset=1, prediction_type="x0",
          lower_order_final=False), "cosine"),
    (dict(sigma_schedule="beta", spacing="trailing"), "scaled_linear"),
])
def test_export_round_trip(options, schedule):
    """:func:`~jaxdiff.convert.scheduler_to_diffusers` writes a config that diffusers builds
    into the scheduler with those settings (same grid), and that loads back as the same
    sampler."""
    kw = dict(beta_start=0.00085, beta_end=0.012) if schedule == "scaled_linear" else {}
    sampler = get_sampler("deis", **options)
    config = scheduler_to_diffusers(sampler, schedule, 1000, **kw)
    assert config["_class_name"] == CLASS
    back = sampler_from_diffusers_config(config)
    assert back.spec is DEIS and back.effective_options == sampler.effective_options
    ref = DEISMultistepScheduler.from_config(
        {k: v for k, v in config.items() if k != "rescale_betas_zero_snr"})
    ref.set_timesteps(9)
    grid = deis_timesteps(make_schedule(schedule, 1000, **kw), 9,
                          spacing=sampler.effective_options["spacing"],
                          steps_offset=sampler.effective_options["steps_offset"],
                          sigma_schedule=sampler.effective_options["sigma_schedule"])
    np.testing.assert_array_equal(grid.timesteps, ref.timesteps.numpy())
    # diffusers' float32 cumprod vs jaxdiff's float64 one: the training sigmas' bound
    # (tolerances.train_sigma_rtol) at the grid's end points (t = 0 included), which a Karras /
    # exponential / beta grid passes on summed, and the cast of a float64 grid
    rel = 2 * train_sigma_rtol(ref)[[0, *grid.timesteps]].max() + GRID_SIGMA_RTOL
    np.testing.assert_allclose(grid.sigmas, ref.sigmas.numpy(), rtol=rel)
    with pytest.raises(ValueError, match="rescale_betas_zero_snr"):
        scheduler_to_diffusers(sampler, schedule, 1000, rescale_to_zero_terminal_snr=True, **kw)


# -------------------------------------------------------------------------- Stable Diffusion


@pytest.mark.slow
def test_stable_diffusion_folder_with_deis(tmp_path):
    """A tiny SD 1.x folder that ships ``DEISMultistepScheduler`` (third order; SD 1.x's
    ``"leading"`` spacing with ``steps_offset=1``) loads with DEIS as its sampler and generates
    diffusers' ``StableDiffusionPipeline`` images (guidance 7.5, 4 steps), to the tolerances of
    test_sd_pipeline_parity.py."""
    from jaxdiff.pipelines import load_stable_diffusion
    from jaxdiff.pipelines.tiny import write_tiny_stable_diffusion
    from tests.parity.test_sd_pipeline_parity import NEGATIVES, PROMPTS, _compare

    options = dict(solver_order=3, timestep_spacing="leading", steps_offset=1)
    pipe = write_tiny_stable_diffusion(str(tmp_path), scheduler=CLASS, scheduler_options=options,
                                       seed=2)
    sd = load_stable_diffusion(str(tmp_path))
    assert sd.sampler.name == "deis" and sd.sampler.effective_options["solver_order"] == 3
    _compare(pipe, sd, prompts=PROMPTS, negatives=NEGATIVES, scale=7.5, steps=4)
