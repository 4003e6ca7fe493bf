"""Singlestep DPM-Solver(++) against diffusers 0.42's ``DPMSolverSinglestepScheduler``: grids
(timesteps, sigmas and ``order_list``) for every option the class supports, whole trajectories
(orders 1-3, midpoint / heun, ``dpmsolver++`` / ``sde-dpmsolver++`` / ``dpmsolver``, eps / x0 /
v, every sigma schedule), image-to-image through ``strength`` against the img2img recipe, the
config import / export round trip, and a tiny Stable Diffusion folder that ships this scheduler.

Both sides run the analytic stand-in model of test_sampler_parity.py (a nearly exact denoiser:
every value O(1)) and, for ``sde-dpmsolver++``, the same noise: diffusers' ``randn_tensor`` is
patched to return the arrays jaxdiff is given (``noise=``; drawing it from ``key`` is the shared
driver's, tested in tests/test_dpm_solver_singlestep.py).
jaxdiff's options come from :func:`jaxdiff.convert.sampler_options_from_diffusers_config` applied
to the scheduler's config, so the mapping is tested with the arithmetic. Both sides use jaxdiff's
float32 ``alphas_cumprod`` (patched into the scheduler before ``set_timesteps``, as in
test_dpmpp_parity.py; the schedules themselves are compared in test_schedule_parity.py).

Tolerances. Timesteps and orders are equal exactly; sigmas within
``tolerances.GRID_SIGMA_RTOL`` (the float32 sigma formula's roundings on both sides, spread by the
Karras / exponential / beta grids). A trajectory's samples are
within ``TRAJ_C * N * ulp(A * M)`` max-abs (:func:`trajectory_tol`), ``N`` the steps, ``M`` the
largest ``|x|`` of diffusers' trajectory and ``A = max alpha_t / alpha_s`` over the steps, ``s``
each step's base point (its group's first): an update adds a few terms each rounded to an ulp
of its magnitude, and the terms carry the model output divided by ``alpha_s`` (an eps model's
x0, or the noise-prediction form's ``(alpha_t / alpha_s) x - sigma_t (e^h - 1) eps``, whose terms
cancel to a result ``A`` times smaller), multiplied back by ``alpha_t`` (``A = 1`` for the data
prediction forms with an x0 or v model). Each side rounds independently and the errors add
over the steps: ``TRAJ_C = 4`` roundings per step and side. Measured (2 CPU cores, AVX2), the
errors are 7-30x below the bound: e.g. 1.1e-6 against 1.1e-5 for 12 third-order heun steps
with a v model; 1.1e-5 against 7.6e-5 for the third-order ``dpmsolver`` case, whose ``A M =
31`` (there diffusers' own float32 run is 1.3e-5 from a float64 run of its code).
Image-to-image: the start sample within ``tolerances.add_noise_atol``, the result within the
trajectory bound. The Stable Diffusion folder: latents and images within the bounds of
test_sd_pipeline_parity.py (``tolerances.pipeline_rtol`` and ``image_atol``).
"""

from __future__ import annotations

import inspect
import itertools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DPMSolverSinglestepScheduler
from diffusers.schedulers import scheduling_dpmsolver_singlestep

from jaxdiff.convert import (
    sampler_from_diffusers_config,
    sampler_options_from_diffusers_config,
    schedule_from_diffusers_config,
    scheduler_to_diffusers,
)
from jaxdiff.samplers import (
    get_sampler,
    img2img_start_step,
    noise_to_img2img,
    sampler_spec,
)
from jaxdiff.samplers.diffusers_names import SCHEDULE_DEFAULTS
from jaxdiff.samplers.dpm_solver_singlestep import (
    dpm_solver_singlestep_sample,
    dpm_solver_singlestep_timesteps,
)
from jaxdiff.schedules import make_schedule
from tests.parity.test_sampler_parity import standin
from tests.parity.tolerances import (
    GRID_SIGMA_RTOL,
    add_noise_atol,
    diffusers_alphas_cumprod_atol,
    image_atol,
    pipeline_rtol,
    within,
)

CLASS = "DPMSolverSinglestepScheduler"
TRAJ_C = 4
SHAPE = (2, 3, 6, 6)  # NCHW on the torch side; the stand-in is elementwise
DIFFUSERS_NAME = {"linear": "linear", "scaled_linear": "scaled_linear",
                  "cosine": "squaredcos_cap_v2"}
BETAS = {"linear": {}, "scaled_linear": dict(beta_start=0.00085, beta_end=0.012), "cosine": {}}
SCHEDULES = {name: make_schedule(name, 1000, **BETAS[name]) for name in DIFFUSERS_NAME}
GRID_KEYS = ("solver_order", "lower_order_final", "final_sigmas_type", "lambda_min_clipped",
             "sigma_schedule")

K, E, B = (dict(use_karras_sigmas=True), dict(use_exponential_sigmas=True),
           dict(use_beta_sigmas=True))
SDE, NOISE_PRED = (dict(algorithm_type="sde-dpmsolver++"),
                   dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min"))
# (id, schedule, num_steps, diffusers config, whether diffusers draws noise: sde-dpmsolver++)
CASES = [
    ("2s-eps", "linear", 10, dict(), False),
    ("3s-heun-karras-v", "scaled_linear", 12,
     dict(**K, solver_order=3, solver_type="heun", prediction_type="v_prediction"), False),
    ("3s-x0-sigmamin-whole-groups", "linear", 12,
     dict(solver_order=3, prediction_type="sample", final_sigmas_type="sigma_min"), False),
    ("2s-heun-cosine-clipped-x0", "cosine", 15,
     dict(solver_type="heun", lambda_min_clipped=-5.1, prediction_type="sample"), False),
    ("2s-sde-heun-v-noise", "linear", 8,
     dict(**SDE, solver_type="heun", prediction_type="v_prediction"), True),
    ("3s-sde-karras-eps-noise", "scaled_linear", 9, dict(**SDE, **K, solver_order=3), True),
    ("3s-dpmsolver-eps", "linear", 10, dict(**NOISE_PRED, solver_order=3), False),
    ("2s-heun-dpmsolver-beta-v", "scaled_linear", 12,
     dict(**NOISE_PRED, **B, solver_type="heun", prediction_type="v_prediction"), False),
]


def _ref(name, cfg):
    """A fresh diffusers scheduler on ``name`` (``set_timesteps`` may switch its
    ``lower_order_final`` on for good), with jaxdiff's float32 ``alphas_cumprod``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the dpmsolver deprecation
        ref = DPMSolverSinglestepScheduler(num_train_timesteps=1000,
                                           beta_schedule=DIFFUSERS_NAME[name], **BETAS[name],
                                           **cfg)
    acp = torch.from_numpy(np.array(SCHEDULES[name].alphas_cumprod))
    ref.alphas_cumprod = acp
    ref.alpha_t, ref.sigma_t = torch.sqrt(acp), torch.sqrt(1 - acp)
    ref.lambda_t = torch.log(ref.alpha_t) - torch.log(ref.sigma_t)
    return ref


def _options(ref):
    return sampler_options_from_diffusers_config({**ref.config, "_class_name": CLASS})


def _check_grid(name, n, cfg):
    """jaxdiff's grid for the config against ``set_timesteps(n)``; returns it."""
    ref = _ref(name, cfg)
    opts = _options(ref)  # read before set_timesteps changes the config
    ref.set_timesteps(n)
    grid = dpm_solver_singlestep_timesteps(SCHEDULES[name], n,
                                           **{k: opts[k] for k in GRID_KEYS})
    label = (name, n, cfg)
    np.testing.assert_array_equal(grid.timesteps, ref.timesteps.numpy(), err_msg=str(label))
    np.testing.assert_allclose(grid.sigmas, ref.sigmas.numpy(), rtol=GRID_SIGMA_RTOL, atol=0,
                               err_msg=str(label))
    assert grid.orders.tolist() == list(ref.order_list), label
    return grid


def trajectory_tol(ref_traj, sigmas, orders, options, start=0):
    """``TRAJ_C * N * ulp(A * M)`` (module docstring); ``sigmas [N + 1]``, ``orders [N]`` the
    orders that run from ``start``. ``A = 1`` where nothing is divided by ``alpha_s``: the data
    prediction forms with an x0 or v model (``x0 = alpha x - sigma v``)."""
    alpha = 1.0 / np.sqrt(1.0 + np.asarray(sigmas, np.float64) ** 2)
    steps = np.arange(start, len(orders))
    base = steps - np.asarray(orders)[steps] + 1
    amp = 1.0
    if options["prediction_type"] == "eps" or options["algorithm_type"] == "dpmsolver":
        amp = max(1.0, float(np.max(alpha[steps + 1] / alpha[base])))
    big = amp * float(np.abs(ref_traj).max())
    return TRAJ_C * len(steps) * float(np.spacing(np.float32(big)))


def test_grids_match_set_timesteps():
    """Every option of the class's grid: the sigma schedules, both final sigmas, orders 1-3
    with and without ``lower_order_final`` (diffusers switches it on where it must),
    ``lambda_min_clipped``, step counts from 1 to T - 1 (the linspace grid's limit)."""
    schedules = (dict(), K, E, B)
    count = 0
    for name, sig, final, order, lof, n in itertools.product(
            ("linear", "cosine"), schedules, ("zero", "sigma_min"), (1, 2, 3), (False, True),
            (1, 2, 6, 7)):
        if name == "cosine" and (sig is B or order == 1):
            continue  # fewer cases: the cosine schedule's rounding is covered by karras / exp
        _check_grid(name, n, dict(**sig, final_sigmas_type=final, solver_order=order,
                                  lower_order_final=lof))
        count += 1
    for name, n, cfg in [("scaled_linear", 25, dict(**K, solver_order=3)),
                         ("cosine", 20, dict(lambda_min_clipped=-5.1)),
                         ("cosine", 8, dict(**K, lambda_min_clipped=-5.1)),  # no effect there
                         ("linear", 999, dict(solver_order=3)),
                         ("linear", 1000, dict(**E, solver_order=2))]:
        _check_grid(name, n, cfg)
        count += 1
    assert count >= 100


def _run_pair(name, n, cfg, sde, monkeypatch):
    """``(jaxdiff's trajectory, diffusers', the grid)``, the trajectories ``[N + 1, *SHAPE]``
    NCHW numpy."""
    grid = _check_grid(name, n, cfg)
    ref = _ref(name, cfg)
    opts = _options(ref)
    ref.set_timesteps(n)
    rng = np.random.default_rng(0)
    x_T = rng.standard_normal(SHAPE).astype(np.float32)
    noise = rng.standard_normal((n, SHAPE[0], *SHAPE[2:], SHAPE[1])).astype(np.float32)  # NHWC
    torch_noise = iter(torch.from_numpy(np.ascontiguousarray(noise.transpose(0, 1, 4, 2, 3))))
    calls = []

    def fake_randn(shape, **kw):
        calls.append(len(calls))
        return next(torch_noise)

    monkeypatch.setattr(scheduling_dpmsolver_singlestep, "randn_tensor", fake_randn)
    pred = opts["prediction_type"]  # jaxdiff's name ("eps", "x0", "v")
    acp_t = torch.from_numpy(np.array(SCHEDULES[name].alphas_cumprod))
    x = torch.from_numpy(x_T)
    ref_traj = [x.numpy()]
    for t in ref.timesteps:
        out = standin(torch, x, torch.full((x.shape[0],), int(t)), acp_t, pred)
        x = ref.step(out, t, x).prev_sample
        ref_traj.append(x.numpy())
    assert len(calls) == (n if sde else 0)  # one draw a step for the SDE

    acp = SCHEDULES[name].alphas_cumprod
    sample = jax.jit(lambda x, z: dpm_solver_singlestep_sample(
        lambda x, t: standin(jnp, x, t, acp, pred), SCHEDULES[name], x, None, num_steps=n,
        noise=z, return_trajectory=True, **opts))
    # the ODE algorithms take the noise too (shape-checked, unused)
    _, traj, _ = sample(jnp.asarray(x_T.transpose(0, 2, 3, 1)), jnp.asarray(noise))
    return np.asarray(traj).transpose(0, 1, 4, 2, 3), np.stack(ref_traj), grid, opts


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_trajectory(case, monkeypatch):
    case_id, name, n, cfg, sde = case
    traj, ref_traj, grid, opts = _run_pair(name, n, cfg, sde, monkeypatch)
    assert np.isfinite(ref_traj).all()
    err = float(np.abs(traj - ref_traj).max())
    tol = trajectory_tol(ref_traj, grid.sigmas, grid.orders, opts)
    print(f"{case_id}: max abs diff {err:.3g} (bound {tol:.3g})")
    assert err <= tol, (err, tol)


@pytest.mark.parametrize("n,strength,cfg", [
    (10, 0.6, dict(solver_order=3, **K)),  # starts on a group's 2nd step: orders 1, 2, 1, ...
    (9, 0.5, dict(prediction_type="v_prediction", solver_type="heun")),
], ids=["3s-karras-eps", "2s-heun-v"])
def test_image_to_image_matches_the_img2img_recipe(n, strength, cfg):
    """diffusers' img2img recipe: ``set_timesteps``, keep ``timesteps[t_start:]``,
    ``set_begin_index(t_start)``, ``add_noise`` at the first kept timestep, the scheduler loop."""
    name = "scaled_linear"
    ref = _ref(name, cfg)
    config = {**ref.config, "_class_name": CLASS}
    sampler, schedule = sampler_from_diffusers_config(config), SCHEDULES[name]
    ref.set_timesteps(n)
    t_start = n - min(int(n * strength), n)
    timesteps = ref.timesteps[t_start:]
    ref.set_begin_index(t_start)
    rng = np.random.default_rng(1)
    x0 = rng.standard_normal((2, 4, 4, 3)).astype(np.float32)
    noise = rng.standard_normal(x0.shape).astype(np.float32)
    lat = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), timesteps[:1].repeat(2))
    start_ref, path = lat.numpy().copy(), [lat.numpy().copy()]
    pred = sampler.options["prediction_type"]
    acp_t = torch.from_numpy(np.array(schedule.alphas_cumprod))
    for t in timesteps:
        lat = ref.step(standin(torch, lat, torch.full((2,), int(t)), acp_t, pred), t,
                       lat).prev_sample
        path.append(lat.numpy())

    assert img2img_start_step(sampler, schedule, n, strength) == t_start
    x_s = noise_to_img2img(sampler, schedule, n, jnp.asarray(x0), jnp.asarray(noise), strength)
    np.testing.assert_allclose(np.asarray(x_s), start_ref, rtol=0,
                               atol=add_noise_atol(ref, timesteps[0], x0, noise, start_ref))
    acp = schedule.alphas_cumprod
    out = jax.jit(lambda x: sampler(lambda x, t: standin(jnp, x, t, acp, pred), schedule, x,
                                    num_steps=n, strength=strength))(jnp.asarray(start_ref))
    grid = dpm_solver_singlestep_timesteps(schedule, n, **{
        k: sampler.effective_options[k] for k in GRID_KEYS})
    orders = np.minimum(grid.orders, np.maximum(np.arange(n) - t_start + 1, 1))
    if t_start == 4 and n == 10:  # the group in progress restarts at the start step
        assert grid.orders[4:6].tolist() == [2, 3] and orders[4:7].tolist() == [1, 2, 1]
    err = float(np.abs(np.asarray(out) - path[-1]).max())
    tol = trajectory_tol(np.stack(path), grid.sigmas, orders, sampler.effective_options, t_start)
    print(f"img2img n={n} strength={strength}: max abs diff {err:.3g} (bound {tol:.3g})")
    assert err <= tol, (err, tol)


class _Reads(dict):
    """A config that records the keys read from it."""

    def __init__(self, *args):
        super().__init__(*args)
        self.read = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)


def test_twin_declares_every_constructor_argument():
    """Every argument of the class's constructor is a schedule key or in the twin's defaults
    with diffusers' default value, and is read by an option, or in ``must_be`` / ``no_effect``:
    none is silently dropped."""
    twin = sampler_spec("dpm_solver_singlestep").diffusers
    params = inspect.signature(DPMSolverSinglestepScheduler.__init__).parameters
    ctor = {k: p.default for k, p in params.items() if k != "self"}
    besides = {k: v for k, v in ctor.items() if k not in SCHEDULE_DEFAULTS}
    assert {k: twin.defaults[k] for k in besides} == besides
    # nothing but its arguments; rescale_betas_zero_snr is the one schedule key it does not take
    assert set(twin.defaults) == set(besides)
    assert twin.schedule_keys == set(ctor) & set(SCHEDULE_DEFAULTS)
    config = _Reads({**SCHEDULE_DEFAULTS, **twin.defaults})
    for fn in twin.options.values():
        fn(config)
    covered = config.read | set(twin.must_be) | twin.no_effect
    assert set(besides) <= covered, set(besides) - covered


@pytest.mark.parametrize("options", [
    dict(),
    dict(solver_order=3, solver_type="heun", sigma_schedule="karras", prediction_type="v"),
    dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min", lower_order_final=True,
         sigma_schedule="beta", prediction_type="x0"),
    dict(algorithm_type="sde-dpmsolver++", sigma_schedule="exponential", solver_order=1,
         lambda_min_clipped=-5.1),
], ids=["defaults", "3s-heun-karras-v", "dpmsolver-beta-x0", "sde-exponential-1"])
def test_export_loads_in_diffusers_as_the_same_scheduler(options):
    """``scheduler_to_diffusers`` -> ``DPMSolverSinglestepScheduler.from_config``: the same
    options read back, the same schedule and the same grid (timesteps, sigmas, orders)."""
    sampler = get_sampler("dpm_solver_singlestep", **options)
    config = scheduler_to_diffusers(sampler, "scaled_linear", 1000, beta_start=0.00085,
                                    beta_end=0.012)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ref = DPMSolverSinglestepScheduler.from_config(config)
    assert type(ref).__name__ == CLASS
    back = sampler_from_diffusers_config({**ref.config, "_class_name": CLASS})
    assert back.effective_options == sampler.effective_options
    schedule = schedule_from_diffusers_config(config)
    # diffusers' float32 cumprod (tolerances.diffusers_alphas_cumprod_atol)
    within(np.abs(np.asarray(schedule.alphas_cumprod) - ref.alphas_cumprod.numpy()),
           diffusers_alphas_cumprod_atol(ref), "alphas_cumprod")
    ref.alphas_cumprod = torch.from_numpy(np.array(schedule.alphas_cumprod))
    ref.set_timesteps(12)
    grid = dpm_solver_singlestep_timesteps(schedule, 12, **{
        k: sampler.effective_options[k] for k in GRID_KEYS})
    np.testing.assert_array_equal(grid.timesteps, ref.timesteps.numpy())
    np.testing.assert_allclose(grid.sigmas, ref.sigmas.numpy(), rtol=GRID_SIGMA_RTOL, atol=0)
    assert grid.orders.tolist() == list(ref.order_list)


@pytest.mark.slow
def test_stable_diffusion_folder_with_this_scheduler(tmp_path):
    """A tiny SD folder whose ``scheduler_config.json`` is ``DPMSolverSinglestepScheduler``
    (third order, Karras sigmas): jaxdiff loads it with its own scheduler (no ``sampler=``) and
    matches ``StableDiffusionPipeline``, 4 steps with classifier-free guidance."""
    from jaxdiff.pipelines import generate, load_stable_diffusion
    from jaxdiff.pipelines.tiny import write_tiny_stable_diffusion

    pipe = write_tiny_stable_diffusion(str(tmp_path), scheduler=CLASS, seed=0,
                                       scheduler_options=dict(solver_order=3,
                                                              use_karras_sigmas=True))
    pipe.set_progress_bar_config(disable=True)
    sd = load_stable_diffusion(str(tmp_path))
    assert sd.sampler.name == "dpm_solver_singlestep"
    assert sd.sampler.options["solver_order"] == 3
    prompts, negatives = ["a cat", "the dog of a cat"], ["", "a dog"]
    lat = np.random.default_rng(0).standard_normal((2, 16, 16, 4)).astype(np.float32)
    ref_lat = pipe(prompts, negative_prompt=negatives, num_inference_steps=4, guidance_scale=7.5,
                   latents=torch.from_numpy(lat.transpose(0, 3, 1, 2).copy()), height=32,
                   width=32, output_type="latent").images
    out = generate(sd, prompts, negatives, num_steps=4, guidance_scale=7.5, latents=lat, seed=0)
    with torch.no_grad():
        dec = pipe.vae.decode(ref_lat / pipe.vae.config.scaling_factor).sample
    ref = (dec / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    img_err = float(np.abs(out.float_images - ref).max())
    ref_lat = ref_lat.numpy().transpose(0, 2, 3, 1)
    lat_err = float(np.abs(out.latents - ref_lat).max() / max(1.0, np.abs(ref_lat).max()))
    print(f"SD folder: image max err {img_err:.2e}, latent max err (relative) {lat_err:.2e}")
    lat_bound = pipeline_rtol(pipe, 7.5)
    within(img_err, image_atol(pipe, lat_bound, ref_lat, dec.numpy()), "images")
    within(lat_err, lat_bound, "latents / max(1, max|latents|)")
