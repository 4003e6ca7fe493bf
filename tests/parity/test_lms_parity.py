"""LMS (jaxdiff.samplers.lms) against diffusers' ``LMSDiscreteScheduler`` (PyTorch, float32):
grids, coefficients, whole trajectories (eps / v / x0, several orders and step counts),
image-to-image through ``strength``, the scheduler-config import and export.

The trajectories run jaxdiff's jitted ``lms_sample`` and diffusers' pipeline loop
(test_euler_parity.py's ``ref_loop``) on the same standard normal ``x_T`` with the same stand-in
model (test_euler_parity.py's ``standin_sigma``: nearly the exact denoiser, so every predicted x0
is O(1)); each diffusers scheduler gets jaxdiff's float32 ``alphas_cumprod`` before
``set_timesteps``, so that both grids come from the same values.

Tolerances, derived (``EPS = 2**-23``, float32's epsilon):

- grid: sigmas within ``4 EPS`` relative and timesteps within 4 float32 ulps of ``T`` (both sides
  take the same float32 ``alphas_cumprod``; ``sigma = sqrt((1 - abar) / abar)`` is then rounded
  by numpy on one side and torch on the other, and Karras / exponential / beta sigmas map back to
  fractional timesteps through that). The grid is the Euler one, compared over every option
  combination and three schedules in test_sigma_grid_parity.py; here each combination once;
- coefficients: diffusers evaluates the Lagrange product in float32 (jaxdiff integrates exactly
  in float64): ``q - 1`` factors of a subtraction and a division each, so ``(q - 1) EPS``
  relative pointwise (a factor ``tau - sigma_k`` near its node loses relative precision, but is
  then small), and the quadrature's weighted sum as much again: row ``i`` of order ``q`` agrees
  within ``8 q EPS sum_j |c_ij|`` (x4 for margin);
- trajectories: each step rounds about 8 float32 values of the size of the sample (the scaled
  input, ``x0 = x - sigma out``, the derivative, the products ``c d``, their sum, ``x + sum``):
  ``4 EPS max|x_j|``; diffusers' float32 coefficients (above) add as much on the step ``|x_{j+1}
  - x_j| <= |x_j| + |x_{j+1}|``. Earlier errors carry into later steps with O(1) gain (the
  stand-in's flow contracts), so after step ``i`` the sample agrees within ``K EPS sum_{j <= i}
  max|x_j|`` with ``K = 16`` ((4 + 4) x 2 for the gain). The cosine schedule's first sigma (2.0e4)
  gives ``|x| ~ 5e4``, whose float32 ulp (4e-3) both sides then cancel down to O(1): the bound
  grows with it, as it must.

Every test prints its worst error as a fraction of its bound (all measured <= 1/3).
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import LMSDiscreteScheduler

from jaxdiff.convert import (
    sampler_from_diffusers_config,
    schedule_from_diffusers_config,
    scheduler_to_diffusers,
)
from jaxdiff.samplers import (
    get_sampler,
    lms_coefficients,
    lms_sample,
    lms_timesteps,
    noise_to_img2img,
    strength_start_step,
)
from tests.parity.test_euler_parity import (
    DIFFUSERS_PRED,
    SCHEDULES,
    SIGMA_FLAGS,
    jax_model,
    make_ref,
    ref_loop,
    standin_sigma,
    torch_model,
    x_T,
)
from tests.parity.tolerances import add_noise_atol, diffusers_alphas_cumprod_atol, within

EPS = float(np.finfo(np.float32).eps)
K = 16
T = 1000


def path_bound(ref_xs):
    """``[N + 1]``: ``K EPS sum_{j <= i} max|x_j|`` over diffusers' path ``ref_xs``."""
    scale = np.abs(np.asarray(ref_xs, np.float64)).reshape(len(ref_xs), -1).max(axis=1)
    return K * EPS * np.cumsum(scale)


def check_path(ours, ref_xs, label):
    """Every sample of ``ours [N + 1, ...]`` within its :func:`path_bound`; returns the worst
    error as a fraction of the bound."""
    ours = np.asarray(ours, np.float64)
    assert ours.shape == ref_xs.shape, (ours.shape, ref_xs.shape)
    err = np.abs(ours - ref_xs).reshape(len(ref_xs), -1).max(axis=1)
    ratio = float((err / path_bound(ref_xs)).max())
    print(f"{label}: max err {err.max():.2e}, {ratio:.3f} of the bound")
    assert ratio <= 1.0, (label, err.tolist(), path_bound(ref_xs).tolist())
    return ratio


def coefficient_bound(coefficients):
    """``[N]`` the per-row bound on ``sum_j |c_ij - c'_ij|`` (module docstring)."""
    q = (coefficients != 0).sum(axis=1)
    return 8 * q * EPS * np.abs(coefficients).sum(axis=1)


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


# ---------------------------------------------------------------------------------------------
# Grids and coefficients


# Every timestep spacing (and steps_offset) x every sigma schedule the class supports, the
# training schedule and the step count cycling through three each.
GRID_CASES = [(("linear", "scaled_linear", "cosine")[k % 3], spacing, offset, sigma_schedule,
               (1, 7, 25)[(k // 3) % 3])
              for k, ((spacing, offset), sigma_schedule) in enumerate(
                  (so, ss) for so in (("linspace", 0), ("leading", 1), ("trailing", 0),
                                      ("leading", 0)) for ss in SIGMA_FLAGS)]


def test_grids_match_set_timesteps():
    """16 grids: every option combination of the class once."""
    assert len(GRID_CASES) == 16
    worst_s = worst_t = 0.0
    for name, spacing, offset, sigma_schedule, n in GRID_CASES:
        ref = make_ref(LMSDiscreteScheduler, name, timestep_spacing=spacing, steps_offset=offset,
                       **SIGMA_FLAGS[sigma_schedule])
        ref.set_timesteps(n)
        grid = lms_timesteps(SCHEDULES[name], n, spacing=spacing, steps_offset=offset,
                             sigma_schedule=sigma_schedule)
        rs, rt = ref.sigmas.numpy().astype(np.float64), ref.timesteps.numpy()
        assert grid.sigmas.dtype == np.float32 and grid.timesteps.dtype == np.float32
        assert grid.sigmas.shape == (n + 1,) and grid.sigmas[-1] == rs[-1] == 0.0
        err_s = float((np.abs(grid.sigmas[:-1] - rs[:-1]) / rs[:-1]).max())
        err_t = float(np.abs(grid.timesteps.astype(np.float64) - rt).max())
        label = (name, spacing, offset, sigma_schedule, n)
        assert err_s <= 4 * EPS, (label, err_s)
        assert err_t <= 4 * EPS * T, (label, err_t)
        assert np.isclose(float(ref.init_noise_sigma),
                          np.max(grid.sigmas) if spacing != "leading"
                          else np.sqrt(np.max(grid.sigmas) ** 2 + 1), rtol=4 * EPS)
        worst_s, worst_t = max(worst_s, err_s / (4 * EPS)), max(worst_t, err_t / (4 * EPS * T))
    print(f"grids: sigmas {worst_s:.2f}, timesteps {worst_t:.2f} of their bounds")


@pytest.mark.parametrize("name, spacing, sigma_schedule, n, order", [
    ("scaled_linear", "leading", "discrete", 12, 4),
    ("cosine", "linspace", "beta", 9, 4),   # nodes at 2.0e4, 1.8e4, 1.5e4: the float32 worst
    ("linear", "trailing", "karras", 8, 3),
    ("scaled_linear", "linspace", "exponential", 10, 6),
])
def test_coefficients_match_get_lms_coefficient(name, spacing, sigma_schedule, n, order):
    ref = make_ref(LMSDiscreteScheduler, name, timestep_spacing=spacing,
                   **SIGMA_FLAGS[sigma_schedule])
    ref.set_timesteps(n)
    sigmas = ref.sigmas.numpy()
    ours = lms_coefficients(sigmas, order)
    assert ours.shape == (n, order)
    theirs = np.zeros_like(ours)
    for i in range(n):
        q = min(i + 1, order)
        theirs[i, :q] = [ref.get_lms_coefficient(q, i, j) for j in range(q)]
    np.testing.assert_array_equal(ours == 0, theirs == 0)  # the same (triangular) structure
    err = np.abs(ours - theirs).sum(axis=1)
    ratio = float((err / coefficient_bound(ours)).max())
    print(f"coefficients {name} {sigma_schedule} n={n} order={order}: {ratio:.3f} of the bound")
    assert ratio <= 1.0


# ---------------------------------------------------------------------------------------------
# Whole trajectories


TRAJECTORY_CASES = [
    # name, pred, spacing, offset, sigma_schedule, n, order
    ("scaled_linear", "eps", "linspace", 0, "discrete", 10, 4),
    ("scaled_linear", "v", "leading", 1, "karras", 12, 4),
    ("linear", "x0", "trailing", 0, "exponential", 8, 3),
    ("cosine", "eps", "linspace", 0, "beta", 7, 4),  # sigma 2.0e4 -> 1.9e3 -> 6.4e-3
    ("cosine", "v", "leading", 1, "discrete", 25, 2),
    ("scaled_linear", "eps", "leading", 1, "discrete", 6, 1),  # order 1: Euler
    ("scaled_linear", "x0", "trailing", 0, "discrete", 5, 6),  # order above the step count
]


@pytest.mark.parametrize("case", TRAJECTORY_CASES, ids=lambda c: "-".join(map(str, c)))
def test_trajectory_matches_diffusers(case):
    name, pred, spacing, offset, sigma_schedule, n, order = case
    ref = make_ref(LMSDiscreteScheduler, name, prediction_type=DIFFUSERS_PRED[pred],
                   timestep_spacing=spacing, steps_offset=offset, **SIGMA_FLAGS[sigma_schedule])
    xT = x_T()
    ref_xs = quiet(ref_loop, ref, n, xT, torch_model(name, pred), order=order)
    sample = jax.jit(lambda x: lms_sample(
        jax_model(name, pred), SCHEDULES[name], x, num_steps=n, prediction_type=pred,
        spacing=spacing, steps_offset=offset, sigma_schedule=sigma_schedule, order=order,
        return_trajectory=True))
    x0, xs, pred_x0s = sample(xT)
    assert xs.shape == (n + 1, *xT.shape) and pred_x0s.shape == (n, *xT.shape)
    np.testing.assert_array_equal(np.asarray(xs[-1]), np.asarray(x0))
    check_path(xs, ref_xs, f"lms {case}")


# ---------------------------------------------------------------------------------------------
# Image-to-image: StableDiffusionImg2ImgPipeline's recipe (test_img2img_sampler_parity.py)


SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def _toy(x, t):
    return 0.3 * x + 0.001 * t.reshape((-1,) + (1,) * (x.ndim - 1))


@pytest.mark.parametrize("prediction_type, strength", [
    ("epsilon", 0.6),   # starts at step 4 of 8: order 4's basis, one derivative in the history
    ("v_prediction", 0.9),   # starts at step 1: order 2's basis
    ("epsilon", 1.0),   # every step, from the image noised to the first sigma
])
def test_img2img_matches_diffusers(prediction_type, strength):
    n = 8
    ref = LMSDiscreteScheduler(**SD_BETAS, timestep_spacing="leading", steps_offset=1,
                               prediction_type=prediction_type)
    config = {**dict(ref.config), "_class_name": "LMSDiscreteScheduler"}
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((2, 4, 4, 3)).astype(np.float32)
    noise = rng.standard_normal(x0.shape).astype(np.float32)

    ref.set_timesteps(n)
    t_start = n - min(int(n * strength), n)
    timesteps = ref.timesteps[t_start * ref.order:]
    ref.set_begin_index(t_start * ref.order)
    lat = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), timesteps[:1].repeat(2))
    ref_xs = [lat.numpy().astype(np.float64)]
    for t in timesteps:
        inp = ref.scale_model_input(lat, t)
        lat = ref.step(0.3 * inp + 0.001 * float(t), t, lat).prev_sample
        ref_xs.append(lat.numpy().astype(np.float64))
    ref_xs = np.stack(ref_xs)

    sampler = sampler_from_diffusers_config(config)
    schedule = schedule_from_diffusers_config(config)
    assert sampler.name == "lms" and strength_start_step(n, strength) == t_start
    x_s = noise_to_img2img(sampler, schedule, n, jnp.asarray(x0), jnp.asarray(noise), strength)
    # At strength 1 the sampler scales its x_T by init_noise_sigma (text-to-image's contract).
    scale = float(ref.init_noise_sigma) if t_start == 0 else 1.0
    out, xs, _ = sampler(_toy, schedule, x_s, None, num_steps=n, strength=strength,
                         return_trajectory=True)
    assert xs.shape[0] == n - t_start + 1
    # the start from diffusers' float32 schedule (tolerances.add_noise_atol)
    np.testing.assert_allclose(np.asarray(x_s) * scale, ref_xs[0], rtol=0, atol=add_noise_atol(
        ref, timesteps[0], x0, noise, ref_xs[0]))
    check_path(xs, ref_xs, f"lms img2img {prediction_type} strength={strength}")


# ---------------------------------------------------------------------------------------------
# Scheduler configs: import, export


CONFIGS = [
    dict(),  # the class's defaults: linear betas, linspace
    dict(**SD_BETAS, timestep_spacing="leading", steps_offset=1),  # the SD 1.x folders' LMS
    dict(beta_schedule="squaredcos_cap_v2", use_karras_sigmas=True, timestep_spacing="trailing",
         prediction_type="v_prediction"),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in
                                                                   c.items()) or "defaults")
def test_config_gives_the_diffusers_trajectory(config):
    ref = LMSDiscreteScheduler.from_config(config)
    full = {**config, "_class_name": "LMSDiscreteScheduler"}
    schedule = schedule_from_diffusers_config(full)
    # diffusers' float32 cumprod (tolerances.diffusers_alphas_cumprod_atol)
    within(np.abs(np.asarray(schedule.alphas_cumprod) - ref.alphas_cumprod.numpy()),
           diffusers_alphas_cumprod_atol(ref), "alphas_cumprod")
    sampler = sampler_from_diffusers_config(full)
    assert sampler.name == "lms" and not sampler.stochastic
    acp = np.array(schedule.alphas_cumprod)
    ref.alphas_cumprod = torch.from_numpy(acp)  # compare the samplers, not two roundings
    pred = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}[ref.config.prediction_type]
    assert sampler.effective_options["prediction_type"] == pred
    n = 9
    xT = x_T(1)
    acp_t = torch.from_numpy(acp)

    def torch_fn(x, t):
        return standin_sigma(torch, x, torch.full((x.shape[0],), float(t)), acp_t, pred)

    ref_xs = ref_loop(ref, n, xT, torch_fn)
    got = jax.jit(lambda x: sampler(
        lambda x, t: standin_sigma(jnp, x, t, schedule.alphas_cumprod, pred), schedule, x,
        num_steps=n, return_trajectory=True))(xT)
    check_path(got[1], ref_xs, f"lms config {config}")


@pytest.mark.parametrize("config, match", [
    (dict(beta_schedule="sigmoid"), "beta_schedule"),  # diffusers' LMS raises
    (dict(use_karras_sigmas=True, use_beta_sigmas=True), "use_beta_sigmas"),
    (dict(no_such_key=0), "no_such_key"),  # no scheduler class jaxdiff knows takes it
    (dict(timestep_spacing="uniform"), "spacing"),
    (dict(prediction_type="flow"), "prediction_type"),
])
def test_unsupported_configs_are_errors_that_name_the_key(config, match):
    with pytest.raises(ValueError, match=match):
        sampler_from_diffusers_config({"_class_name": "LMSDiscreteScheduler", **config})


def test_keys_the_class_does_not_take_are_ignored_as_diffusers_ignores_them():
    with pytest.raises(NotImplementedError):  # why sigmoid is refused (above)
        LMSDiscreteScheduler(beta_schedule="sigmoid")
    plain = LMSDiscreteScheduler()
    foreign = dict(_class_name="LMSDiscreteScheduler", rescale_betas_zero_snr=True,
                   final_sigmas_type="zero")  # not arguments of LMS (Euler has both)
    rescaled = quiet(LMSDiscreteScheduler.from_config, foreign)
    assert float(rescaled.alphas_cumprod[-1]) > 0  # not rescaled to zero terminal SNR
    np.testing.assert_array_equal(rescaled.alphas_cumprod.numpy(), plain.alphas_cumprod.numpy())
    within(np.abs(np.asarray(schedule_from_diffusers_config(foreign).alphas_cumprod)
                  - plain.alphas_cumprod.numpy()),
           diffusers_alphas_cumprod_atol(plain), "alphas_cumprod")
    assert sampler_from_diffusers_config(foreign).effective_options == \
        get_sampler("lms").effective_options


@pytest.mark.parametrize("options, schedule, kwargs", [
    (dict(), "linear", dict()),
    (dict(prediction_type="v", spacing="leading", steps_offset=1, sigma_schedule="karras"),
     "scaled_linear", dict(beta_start=0.00085, beta_end=0.012)),
    (dict(prediction_type="x0", spacing="trailing", sigma_schedule="beta"), "cosine", dict()),
])
def test_export_round_trips_through_diffusers(options, schedule, kwargs):
    sampler = get_sampler("lms", **options)
    config = scheduler_to_diffusers(sampler, schedule, T, **kwargs)
    assert config["_class_name"] == "LMSDiscreteScheduler"
    ref = quiet(LMSDiscreteScheduler.from_config, config)
    for key in ("prediction_type", "timestep_spacing", "steps_offset", "use_karras_sigmas",
                "use_exponential_sigmas", "use_beta_sigmas", "beta_schedule", "beta_start",
                "beta_end", "num_train_timesteps"):
        assert ref.config[key] == config[key], key
    back = sampler_from_diffusers_config({**dict(ref.config), "_class_name": config["_class_name"]})
    assert back.spec is sampler.spec and back.effective_options == sampler.effective_options
    within(np.abs(np.asarray(schedule_from_diffusers_config(config).alphas_cumprod)
                  - ref.alphas_cumprod.numpy()),
           diffusers_alphas_cumprod_atol(ref), "alphas_cumprod")


def test_export_refuses_what_the_config_cannot_hold():
    with pytest.raises(ValueError, match=r"order=3 \(loads as 4\) \(diffusers takes LMS's order at "
                                         r"call time"):
        scheduler_to_diffusers(get_sampler("lms", order=3), "linear", T)
    with pytest.raises(ValueError, match="rescale_betas_zero_snr"):
        scheduler_to_diffusers(get_sampler("lms"), "linear", T, rescale_to_zero_terminal_snr=True)
    with pytest.raises(ValueError, match="beta_schedule"):
        scheduler_to_diffusers(get_sampler("lms"), "sigmoid", T)


# ---------------------------------------------------------------------------------------------
# A Stable Diffusion folder whose scheduler is LMS (test_sd_pipeline_parity.py's recipe)


@pytest.mark.slow
def test_stable_diffusion_folder_runs_with_its_lms_scheduler(tmp_path):
    """The folder's ``LMSDiscreteScheduler`` is its sampler (no ``sampler=``), and jaxdiff's
    images are diffusers' ``StableDiffusionPipeline``'s, to that file's tolerances."""
    pytest.importorskip("transformers")
    from jaxdiff.pipelines import load_stable_diffusion
    from jaxdiff.pipelines.tiny import write_tiny_stable_diffusion
    from tests.parity.test_sd_pipeline_parity import NEGATIVES, PROMPTS, _compare

    pipe = write_tiny_stable_diffusion(str(tmp_path), scheduler="LMSDiscreteScheduler",
                                       scheduler_options=dict(timestep_spacing="leading",
                                                              steps_offset=1))
    sd = load_stable_diffusion(str(tmp_path))
    assert sd.sampler.name == "lms"
    assert sd.sampler.effective_options["spacing"] == "leading"
    quiet(_compare, pipe, sd, prompts=PROMPTS, negatives=NEGATIVES, scale=7.5, steps=4)
