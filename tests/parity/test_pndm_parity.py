"""PNDM (jaxdiff.samplers.pndm) against diffusers' ``PNDMScheduler`` (PyTorch, float32): the
model-evaluation grids of ``set_timesteps`` for every spacing / option, whole trajectories (PLMS
and F-PNDM, eps and v) driven by diffusers' scheduler loop on the same stand-in model, the
image-to-image tails of ``StableDiffusionImg2ImgPipeline`` (``timesteps[t_start:]`` with the
counter restarted, ``add_noise`` at the first), and the scheduler-config import and export.

The diffusers scheduler gets jaxdiff's float32 ``alphas_cumprod`` (the schedules are compared in
test_schedule_parity.py), so the trajectories compare the samplers' arithmetic.

Tolerance (float32, unit roundoff ``u = 2**-24``). Each model evaluation's update forms
``A x - B e`` with ``A = sqrt(abar_t / abar_s)`` (up to 158 from ``t = 999`` of the linear
schedule), where ``B e`` cancels most of ``A x``: the two frameworks' roundings of the update
(a few operations) differ by a few ``u`` relative to ``(1 + A) |x|``. The stand-in model's
output, an eps (or v) computed as ``(x - sqrt(abar) x0) / sigma``, carries rounding ``u |x| /
sigma`` at its timestep's ``sigma = sqrt(1 - abar)`` (70 ``u |x|`` at ``t = 1`` of the linear
schedule), which the update multiplies by ``|B|`` times the combination's weights ``W = sum
|weights|`` (the history's outputs come from larger sigmas). The ODE flow of the stand-in (the
exact denoiser of data with variance 0.25 < 1) does not amplify an error made earlier. So a
trajectory's bound is ``C u X sum_k (1 + A_k + |B_k| W_k / sigma_k)`` over its evaluations
``k``, ``X`` the largest ``|x|`` on diffusers' trajectory, ``C = 16`` (measured: at most 2.1 of
that sum's ``u X`` on the cases below, a 7.7x margin; most cases below 0.4).
"""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from jaxdiff.convert import (  # noqa: E402
    sampler_from_diffusers_config,
    schedule_from_diffusers_config,
    scheduler_to_diffusers,
)
from jaxdiff.samplers import get_sampler, noise_to_img2img, strength_start_step  # noqa: E402
from jaxdiff.samplers.pndm import pndm_plan, pndm_timesteps  # noqa: E402
from jaxdiff.schedules import make_schedule  # noqa: E402
from tests.parity.test_sampler_parity import standin  # noqa: E402
from tests.parity.tolerances import diffusers_alphas_cumprod_atol, within  # noqa: E402

U = 2.0**-24
C = 16.0
T = 1000
SHAPE = (2, 4, 4, 3)
DIFFUSERS_PRED = {"eps": "epsilon", "v": "v_prediction"}
SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
SCHEDULES = {"linear": make_schedule("linear", T), "cosine": make_schedule("cosine", T),
             "sd": make_schedule("scaled_linear", T, beta_start=0.00085, beta_end=0.012)}


def _ref(schedule_name, *, pred="eps", set_alpha_to_one=False, **config):
    """A PNDMScheduler on jaxdiff's alphas_cumprod."""
    ref = diffusers.PNDMScheduler(num_train_timesteps=T, prediction_type=DIFFUSERS_PRED[pred],
                                  set_alpha_to_one=set_alpha_to_one, **config)
    ref.alphas_cumprod = torch.from_numpy(np.array(SCHEDULES[schedule_name].alphas_cumprod))
    ref.final_alpha_cumprod = (torch.tensor(1.0) if set_alpha_to_one
                               else ref.alphas_cumprod[0])
    return ref


def _run_ref(ref, schedule_name, pred, x, timesteps):
    """diffusers' loop over ``timesteps`` from ``x`` (NHWC numpy, the scheduler is elementwise);
    every evaluation's sample ``[E + 1, ...]``."""
    acp = torch.from_numpy(np.array(SCHEDULES[schedule_name].alphas_cumprod))
    xt, xs = torch.from_numpy(x.copy()), [x]
    for t in timesteps:
        out = standin(torch, xt, torch.full((x.shape[0],), int(t)), acp, pred)
        xt = ref.step(out, t, xt).prev_sample
        xs.append(xt.numpy().copy())
    return np.stack(xs)


def _bound(schedule_name, grid, start, set_alpha_to_one, ref_xs):
    """``C u X sum_k (1 + A_k + |B_k| W_k / sigma_k)`` (module docstring) over the evaluations
    from ``start``, and the plan."""
    acp = np.asarray(SCHEDULES[schedule_name].alphas_cumprod, np.float64)
    plan = pndm_plan(grid, T, start)
    final = 1.0 if set_alpha_to_one else acp[0]
    a_t = np.where(plan.to_timestep >= 0, acp[np.maximum(plan.to_timestep, 0)], final)
    a_s = acp[plan.from_timestep]
    growth = np.sqrt(a_t / a_s)
    shift = np.abs(a_t - a_s) / (a_s * np.sqrt(1 - a_t) + np.sqrt(a_s * (1 - a_s) * a_t))
    model = shift * np.abs(plan.weights).sum(1) / np.sqrt(1 - acp[plan.timestep])
    return C * U * np.abs(ref_xs).max() * np.sum(1.0 + growth + model), plan


def _sampler_model(schedule_name, pred):
    acp = SCHEDULES[schedule_name].alphas_cumprod
    return lambda x, t: standin(jnp, x, t, acp, pred)


def test_model_timesteps_are_set_timesteps():
    """Every spacing, ``steps_offset`` (which only ``"leading"`` reads), PLMS and F-PNDM, for
    ``N = 1 .. 100`` (F-PNDM: ``N >= 4``; diffusers' grid arithmetic fails below). Where
    diffusers' ``"trailing"`` arange yields an extra level (N = 61, ...), its list is jaxdiff's
    plus a timestep ``-1`` (which torch reads as ``alphas_cumprod[-1]``)."""
    extra = 0
    for skip in (True, False):
        for spacing in ("leading", "linspace", "trailing"):
            for offset in (0, 1):
                ref = diffusers.PNDMScheduler(skip_prk_steps=skip, timestep_spacing=spacing,
                                              steps_offset=offset)
                for n in range(1 if skip else 4, 101):
                    ref.set_timesteps(n)
                    want = ref.timesteps.numpy()
                    grid = pndm_timesteps(SCHEDULES["linear"], n, skip_prk_steps=skip,
                                          spacing=spacing, steps_offset=offset)
                    got = grid.model_timesteps
                    if len(want) == len(got) + 1:
                        assert spacing == "trailing" and want[-1] == -1, (skip, spacing, n)
                        want, extra = want[:-1], extra + 1
                    np.testing.assert_array_equal(got, want, err_msg=f"{skip} {spacing} {n}")
                    np.testing.assert_array_equal(grid.prk_timesteps, ref.prk_timesteps)
                    np.testing.assert_array_equal(grid.timesteps, want[:n])
                    assert len(grid.sigmas) == n + 1 and grid.sigmas[-1] == 0
    assert extra == 2 * 2  # N = 61 trailing, in 2 modes x 2 offsets


# schedule, skip_prk_steps, spacing, steps_offset, prediction, set_alpha_to_one, N
TRAJECTORIES = [
    ("sd", True, "leading", 1, "eps", False, 10),  # Stable Diffusion 1.x's PLMS
    ("cosine", True, "trailing", 0, "v", True, 7),
    ("linear", True, "linspace", 0, "eps", True, 2),  # the warm-up then one 2-step update
    ("linear", False, "linspace", 0, "eps", False, 4),  # diffusers' smallest F-PNDM
    ("sd", False, "trailing", 0, "v", False, 9),
    ("cosine", False, "leading", 1, "eps", True, 6),
]
# Not a case: F-PNDM from t = 999 of the cosine schedule (abar ~ 1e-9 there): its Runge-Kutta
# stages multiply x by sqrt(abar_916 / abar_999) and the result is no sample (|x| ~ 4e6 on both
# sides, agreeing to 1e-6 relative), beyond what the bound's error model covers.


@pytest.mark.parametrize("name,skip,spacing,offset,pred,sa1,n", TRAJECTORIES)
def test_trajectory_matches_pndm_scheduler(name, skip, spacing, offset, pred, sa1, n):
    ref = _ref(name, pred=pred, set_alpha_to_one=sa1, skip_prk_steps=skip,
               timestep_spacing=spacing, steps_offset=offset)
    ref.set_timesteps(n)
    x_T = np.random.default_rng(n).standard_normal(SHAPE).astype(np.float32)
    ref_xs = _run_ref(ref, name, pred, x_T, ref.timesteps)

    sampler = get_sampler("pndm", skip_prk_steps=skip, spacing=spacing, steps_offset=offset,
                          prediction_type=pred, set_alpha_to_one=sa1)
    schedule = SCHEDULES[name]
    out, xs, _ = jax.jit(lambda x: sampler(_sampler_model(name, pred), schedule, x, None,
                                           num_steps=n, return_trajectory=True))(x_T)
    grid = pndm_timesteps(schedule, n, skip_prk_steps=skip, spacing=spacing,
                          steps_offset=offset)
    bound, plan = _bound(name, grid, 0, sa1, ref_xs)
    assert len(xs) == n + 1 and plan.ends_step.sum() == n
    # the steps' ends: diffusers' samples after the evaluations that complete a step
    want = ref_xs[np.concatenate([[0], 1 + np.flatnonzero(plan.ends_step)])]
    err = float(np.abs(np.asarray(xs) - want).max())
    print(f"pndm {name} skip={skip} {spacing} {pred} n={n}: {err:.2e} (bound {bound:.2e}, "
          f"{err / bound * C:.2f} u X sum)")
    assert err <= bound
    np.testing.assert_array_equal(np.asarray(out), np.asarray(xs[-1]))


# schedule, skip_prk_steps, prediction, N, strength
IMG2IMG = [
    ("sd", True, "eps", 10, 0.55),  # SD 1.5: the tail misses the repeated timestep
    ("linear", True, "v", 4, 0.25),  # one step: the warm-up's two evaluations only
    ("sd", False, "eps", 6, 0.7),  # F-PNDM: 4 steps, stages measured from the text-to-image RK
    ("cosine", False, "v", 5, 0.3),  # one step: the tail stops inside a Runge-Kutta step
]


@pytest.mark.parametrize("name,skip,pred,n,strength", IMG2IMG)
def test_image_to_image_matches_the_img2img_pipeline(name, skip, pred, n, strength):
    """``StableDiffusionImg2ImgPipeline.get_timesteps`` (PNDM's ``order`` is 1, it has no
    ``set_begin_index``: the counter restarts), ``add_noise`` at the first kept timestep."""
    ref = _ref(name, pred=pred, skip_prk_steps=skip, timestep_spacing="leading", steps_offset=1)
    ref.set_timesteps(n)
    t_start = n - min(int(n * strength), n)
    tail = ref.timesteps[t_start:]
    rng = np.random.default_rng(7)
    x0 = rng.standard_normal(SHAPE).astype(np.float32)
    noise = rng.standard_normal(SHAPE).astype(np.float32)
    start_ref = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise),
                              tail[:1].repeat(SHAPE[0])).numpy()
    ref_xs = _run_ref(ref, name, pred, start_ref, tail)

    sampler = get_sampler("pndm", skip_prk_steps=skip, steps_offset=1, prediction_type=pred)
    schedule = SCHEDULES[name]
    s = strength_start_step(n, strength)
    assert s == t_start
    x_s = noise_to_img2img(sampler, schedule, n, jnp.asarray(x0), jnp.asarray(noise), strength)
    np.testing.assert_allclose(np.asarray(x_s), start_ref, atol=8 * U * np.abs(start_ref).max())
    out, xs, _ = jax.jit(lambda x: sampler(_sampler_model(name, pred), schedule, x, None,
                                           num_steps=n, strength=strength,
                                           return_trajectory=True))(start_ref)
    assert len(xs) == n - s + 1
    grid = pndm_timesteps(schedule, n, skip_prk_steps=skip, steps_offset=1)
    bound, plan = _bound(name, grid, s, False, ref_xs)
    assert len(plan.timestep) == len(tail)
    err = float(np.abs(np.asarray(out) - ref_xs[-1]).max())
    print(f"pndm img2img {name} skip={skip} {pred} n={n} strength={strength}: {err:.2e} "
          f"(bound {bound:.2e}, {err / bound * C:.2f} u X sum)")
    assert err <= bound


SD15 = {  # runwayml/stable-diffusion-v1-5's scheduler/scheduler_config.json
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "trained_betas": None, "clip_sample": False,
}


def test_config_import_and_export_round_trip():
    """SD 1.5's config loads as PLMS with its options; a DDIM-converted config (diffusers'
    single-file conversion keeps DDIM's keys) too; the export of a PNDM sampler is a config
    diffusers builds the same scheduler from."""
    sampler = sampler_from_diffusers_config(SD15)
    assert sampler.name == "pndm" and sampler.options == dict(
        skip_prk_steps=True, spacing="leading", steps_offset=1, set_alpha_to_one=False,
        prediction_type="eps")
    schedule = schedule_from_diffusers_config(SD15)
    ref = diffusers.PNDMScheduler.from_config(SD15)
    # diffusers' float32 cumprod (tolerances.diffusers_alphas_cumprod_atol)
    within(np.abs(np.asarray(schedule.alphas_cumprod) - ref.alphas_cumprod.numpy()),
           diffusers_alphas_cumprod_atol(ref), "alphas_cumprod")
    converted = {**SD15, "clip_sample_range": 1.0, "dynamic_thresholding_ratio": 0.995,
                 "prediction_type": "epsilon", "rescale_betas_zero_snr": False,
                 "sample_max_value": 1.0, "thresholding": False, "timestep_spacing": "leading"}
    assert sampler_from_diffusers_config(converted).options == sampler.options
    ref.set_timesteps(10)
    back = diffusers.PNDMScheduler.from_config(converted)
    back.set_timesteps(10)
    np.testing.assert_array_equal(back.timesteps.numpy(), ref.timesteps.numpy())

    for s in (get_sampler("plms", steps_offset=1, prediction_type="v"),
              get_sampler("pndm", spacing="trailing", set_alpha_to_one=True)):
        config = scheduler_to_diffusers(s, "scaled_linear", 1000, beta_start=0.00085,
                                        beta_end=0.012)
        assert config["_class_name"] == "PNDMScheduler"
        back = diffusers.PNDMScheduler.from_config(config)
        want = {"skip_prk_steps": s.effective_options["skip_prk_steps"],
                "timestep_spacing": s.effective_options["spacing"],
                "steps_offset": s.effective_options["steps_offset"],
                "set_alpha_to_one": s.effective_options["set_alpha_to_one"],
                "prediction_type": DIFFUSERS_PRED[s.effective_options["prediction_type"]]}
        assert {k: back.config[k] for k in want} == want
        back.set_timesteps(12)
        np.testing.assert_array_equal(
            pndm_timesteps(schedule, 12, skip_prk_steps=want["skip_prk_steps"],
                           spacing=want["timestep_spacing"],
                           steps_offset=want["steps_offset"]).model_timesteps,
            back.timesteps.numpy())


def test_x0_prediction_is_refused_as_diffusers_refuses_it():
    ref = _ref("linear", skip_prk_steps=True)
    ref.register_to_config(prediction_type="sample")
    ref.set_timesteps(3)
    with pytest.raises(ValueError, match="prediction_type"):
        ref.step(torch.zeros(SHAPE), ref.timesteps[0], torch.zeros(SHAPE))
    with pytest.raises(ValueError, match=r"config\['prediction_type'\] = 'sample'"):
        sampler_from_diffusers_config({**SD15, "prediction_type": "sample"})
    with pytest.raises(ValueError, match="prediction_type must be 'eps' or 'v' for PNDM"):
        get_sampler("pndm", prediction_type="sample")
