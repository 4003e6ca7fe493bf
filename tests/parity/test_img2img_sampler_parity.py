"""Samplers over the tail of their grid (image-to-image through ``strength``) against diffusers'
img2img recipe: ``set_timesteps``, keep ``timesteps[t_start * order:]``, ``set_begin_index``,
``add_noise`` at the first kept timestep, then the scheduler loop. A linear toy model, float32.
Strength 1 too: every step runs from the image noised to the first timestep (the sigma-space
samplers scaled that start by ``init_noise_sigma`` a second time before it was tested here).

LCM against ``LatentConsistencyModelImg2ImgPipeline``'s recipe instead: ``set_timesteps(N,
strength=strength)``, ``add_noise`` at ``timesteps[0]``, all ``N`` steps (its re-noising noise
injected). Both sides build the schedule from the config, diffusers in float32: tolerances
``_start_atol`` and ``_result_atol``, from that schedule's float32 bound and the steps' roundings.
"""

import numpy as np
import pytest

import jax.numpy as jnp

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from jaxdiff.convert.diffusers_scheduler import (  # noqa: E402
    sampler_from_diffusers_config,
    schedule_from_diffusers_config,
)
from jaxdiff.samplers import (  # noqa: E402
    check_strength,
    get_sampler,
    img2img_start_step,
    lcm_timesteps,
    noise_to_img2img,
    sampler_options,
    strength_start_step,
)
from jaxdiff.schedules import make_schedule, scaled_linear_betas  # noqa: E402
from tests.parity.tolerances import (  # noqa: E402
    add_noise_atol,
    float32_betas_atol,
    float32_cumprod_rtol,
    trajectory_atol,
)

SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
CASES = [
    ("DDIMScheduler", dict(clip_sample=False, set_alpha_to_one=False, steps_offset=1)),
    ("DPMSolverMultistepScheduler", dict()),
    ("DPMSolverMultistepScheduler", dict(solver_order=3, use_karras_sigmas=True)),
    ("EulerDiscreteScheduler", dict(timestep_spacing="leading", steps_offset=1)),
    ("UniPCMultistepScheduler", dict()),
    ("UniPCMultistepScheduler", dict(solver_order=3, solver_type="bh2",
                                     timestep_spacing="leading", steps_offset=1)),
    ("HeunDiscreteScheduler", dict(timestep_spacing="leading", steps_offset=1)),
    ("KDPM2DiscreteScheduler", dict(timestep_spacing="leading", steps_offset=1)),
    ("KDPM2AncestralDiscreteScheduler", dict(timestep_spacing="leading", steps_offset=1)),
    ("DDPMScheduler", dict(timestep_spacing="leading", steps_offset=1)),
]
# the stochastic ones: the diffusers module whose randn_tensor is patched to hand out our noise
STOCHASTIC = {"KDPM2AncestralDiscreteScheduler": "scheduling_k_dpm_2_ancestral_discrete",
              "DDPMScheduler": "scheduling_ddpm"}


def _toy(x, t):
    return 0.3 * x + 0.001 * t.reshape((-1,) + (1,) * (x.ndim - 1))


# Tolerances. diffusers' float32 schedule (SD's scaled_linear betas) differs from jaxdiff's by the
# relative bound REL on alphas_cumprod (tolerances.float32_cumprod_rtol); sigma = sqrt((1 - abar) /
# abar) then by REL / (2 (1 - abar)) relative.
_BETAS = scaled_linear_betas(1000, 0.00085, 0.012)
_ABAR = np.cumprod(1 - _BETAS)
REL = float32_cumprod_rtol(_BETAS, float32_betas_atol(_BETAS, "scaled_linear"))


def _start_atol(t, *arrays):
    """The bound on the noised start at timestep ``t`` (tolerances.add_noise_atol)."""
    return add_noise_atol(diffusers.DDPMScheduler(**SD_BETAS), t, *arrays)


def _result_atol(timesteps, evals, *arrays):
    """The bound on the result of a tail (or LCM run) over ``timesteps`` with ``evals`` model
    calls: each call's roundings (``tolerances.trajectory_atol``, at the scale of the largest
    value ``m``, with an eps model's conversion gain ``1 / sqrt(abar)`` at the smallest abar of the
    tail), plus the schedule's difference: a step's coefficients move with ``log sigma`` at both
    of its ends, ``|d x_next / d log sigma| <= |x| + |x0| <= 2 m``, by ``REL / (2 (1 - a))`` each.
    The toy's flows contract as the stand-ins' do (``dx / dsigma = eps ~ 0.3 x``), so the steps'
    errors add."""
    idx = np.clip(np.round(np.asarray(timesteps, np.float64)).astype(int), 0, 999)
    m = max(np.abs(np.asarray(x)).max() for x in arrays)
    rel_sigma = REL[idx] / (2 * (1 - _ABAR[idx]))
    schedule = 2 * m * 2 * rel_sigma.sum()
    return trajectory_atol(evals, m, gain=1 / np.sqrt(_ABAR[idx].min())) + float(schedule)


@pytest.mark.parametrize("cls,extra", CASES)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_tail_matches_diffusers_img2img(cls, extra, prediction_type, strength, monkeypatch):
    n = 8
    sched_t = getattr(diffusers, cls)(**SD_BETAS, **extra, prediction_type=prediction_type)
    config = {**dict(sched_t.config), "_class_name": cls}
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((2, 4, 4, 3)).astype(np.float32)
    noise = rng.standard_normal(x0.shape).astype(np.float32)

    sched_t.set_timesteps(n)
    init = min(int(n * strength), n)
    t_start = max(n - init, 0)
    timesteps = sched_t.timesteps[t_start * sched_t.order:]
    if hasattr(sched_t, "set_begin_index"):
        sched_t.set_begin_index(t_start * sched_t.order)
    step_noise, calls = None, []
    if cls in STOCHASTIC:  # one draw per step of the tail at most, handed out in order
        step_noise = rng.standard_normal((n - t_start,) + x0.shape).astype(np.float32)

        def fake_randn(shape, generator=None, device=None, dtype=None, layout=None):
            assert tuple(shape) == x0.shape, shape
            calls.append(len(calls))
            return torch.from_numpy(step_noise[len(calls) - 1].copy())

        module = getattr(diffusers.schedulers, STOCHASTIC[cls])
        monkeypatch.setattr(module, "randn_tensor", fake_randn)
    xt = torch.from_numpy(x0)
    lat = sched_t.add_noise(xt, torch.from_numpy(noise), timesteps[:1].repeat(2))
    start_ref = lat.numpy().copy()
    for t in timesteps:
        inp = sched_t.scale_model_input(lat, t)
        out = 0.3 * inp + 0.001 * float(t)
        lat = sched_t.step(out, t, lat).prev_sample
    ref = lat.numpy()

    sampler = sampler_from_diffusers_config(config)
    schedule = schedule_from_diffusers_config(config)
    s = strength_start_step(n, strength)
    assert s == t_start == img2img_start_step(sampler, schedule, n, strength)
    x_s = noise_to_img2img(sampler, schedule, n, jnp.asarray(x0), jnp.asarray(noise), strength)
    # At strength 1 a sigma-space sampler scales its x_T by init_noise_sigma (text-to-image's
    # contract): the start it returns is diffusers' divided by that.
    scale = (float(sched_t.init_noise_sigma)
             if s == 0 and sampler.spec.noise_space == "sigma_ve" else 1.0)
    np.testing.assert_allclose(np.asarray(x_s) * scale, start_ref, rtol=0,
                               atol=_start_atol(timesteps[0], x0, noise, start_ref))
    kwargs = {} if step_noise is None else {"noise": jnp.asarray(step_noise)}
    if step_noise is not None:  # every step of the tail but the last draws (the last: t = 1 > 0
        # for DDPM with steps_offset=1; KDPM2 ancestral adds none on its last step)
        assert len(calls) == (n - s if cls == "DDPMScheduler" else n - s - 1), calls
    out = sampler(_toy, schedule, x_s, None, num_steps=n, strength=strength, **kwargs)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=0, atol=_result_atol(
        timesteps.numpy(), len(timesteps), start_ref, ref, *([] if step_noise is None
                                                              else [step_noise])))


@pytest.mark.slow
def test_strength_one_is_the_full_run_and_errors():
    sched = make_schedule("linear", 100)
    x = jnp.ones((1, 3))
    for name in ("ddim", "dpm_solver", "euler", "unipc", "heun", "kdpm2"):
        s = get_sampler(name)
        np.testing.assert_array_equal(np.asarray(s(_toy, sched, x, None, num_steps=5)),
                                      np.asarray(s(_toy, sched, x, None, num_steps=5,
                                                   strength=1.0)))
        with pytest.raises(ValueError, match="strength=0.1 keeps no step"):
            s(_toy, sched, x, None, num_steps=5, strength=0.1)
        with pytest.raises(ValueError, match="start_step is not a call argument.*strength"):
            s(_toy, sched, x, None, num_steps=5, start_step=2)
    with pytest.raises(ValueError, match="strength"):
        strength_start_step(4, 0.1)
    with pytest.raises(ValueError, match="strength"):
        strength_start_step(4, 1.5)
    # a stochastic tail takes noise for the steps that run
    anc = get_sampler("euler_ancestral")
    out = anc(_toy, sched, x, None, num_steps=5, strength=0.4, noise=jnp.zeros((2, 1, 3)))
    assert out.shape == (1, 3)
    with pytest.raises(ValueError, match="noise must have shape"):
        anc(_toy, sched, x, None, num_steps=5, strength=0.4, noise=jnp.zeros((5, 1, 3)))


# n, strength, original_inference_steps, prediction type, clip_sample
LCM_CASES = [
    (4, 0.5, 50, "epsilon", False),  # 499, 379, 259, 139 (the text-to-image tail: 499, 259)
    (3, 0.8, 50, "v_prediction", False),
    (6, 0.35, 20, "epsilon", True),  # 7 distillation timesteps left for 6 steps; clipping
    (1, 0.3, 50, "sample", False),  # one step: no re-noising
    (2, 1.0, 50, "epsilon", False),  # strength 1: text-to-image from a noised image
]


@pytest.mark.parametrize("n,strength,orig,prediction_type,clip", LCM_CASES)
def test_lcm_matches_diffusers_lcm_img2img(n, strength, orig, prediction_type, clip,
                                           monkeypatch):
    sched_t = diffusers.LCMScheduler(**SD_BETAS, prediction_type=prediction_type,
                                     original_inference_steps=orig, clip_sample=clip,
                                     clip_sample_range=0.5)
    config = {**dict(sched_t.config), "_class_name": "LCMScheduler"}
    rng = np.random.default_rng(n)
    x0 = rng.standard_normal((2, 4, 4, 3)).astype(np.float32)
    noise = rng.standard_normal(x0.shape).astype(np.float32)
    step_noise = rng.standard_normal((n,) + x0.shape).astype(np.float32)

    # LatentConsistencyModelImg2ImgPipeline: retrieve_timesteps(..., strength=strength), then
    # prepare_latents at timesteps[:1], then every timestep
    sched_t.set_timesteps(n, strength=strength)
    timesteps, calls = sched_t.timesteps, []

    def fake_randn(shape, generator=None, device=None, dtype=None, layout=None):
        calls.append(sched_t.step_index)
        return torch.from_numpy(step_noise[sched_t.step_index].copy())

    monkeypatch.setattr(diffusers.schedulers.scheduling_lcm, "randn_tensor", fake_randn)
    lat = sched_t.add_noise(torch.from_numpy(x0), torch.from_numpy(noise),
                            timesteps[:1].repeat(2))
    start_ref = lat.numpy().copy()
    for t in timesteps:
        lat, _ = sched_t.step(0.3 * lat + 0.001 * float(t), t, lat, return_dict=False)
    ref = lat.numpy()
    assert calls == list(range(n - 1))

    sampler = sampler_from_diffusers_config(config)
    schedule = schedule_from_diffusers_config(config)
    assert img2img_start_step(sampler, schedule, n, strength) == 0  # all n steps run
    grid = lcm_timesteps(schedule, n, original_inference_steps=orig, strength=strength)
    np.testing.assert_array_equal(grid.timesteps, timesteps.numpy())
    if (n, strength) == (4, 0.5):  # not the tail of the text-to-image grid
        full = lcm_timesteps(schedule, n, original_inference_steps=orig).timesteps
        assert list(full[strength_start_step(n, strength):]) == [499, 259]
        assert list(grid.timesteps) == [499, 379, 259, 139]
    x_s = noise_to_img2img(sampler, schedule, n, jnp.asarray(x0), jnp.asarray(noise), strength)
    np.testing.assert_allclose(np.asarray(x_s), start_ref, rtol=0,
                               atol=_start_atol(timesteps[0], x0, noise, start_ref))
    out = sampler(_toy, schedule, x_s, None, num_steps=n, noise=jnp.asarray(step_noise),
                  strength=strength)
    err = float(np.abs(np.asarray(out) - ref).max())
    print(f"lcm img2img n={n} strength={strength}: max abs err {err:.2e}")
    np.testing.assert_allclose(np.asarray(out), ref, rtol=0, atol=_result_atol(
        timesteps.numpy(), n, start_ref, ref, step_noise))


def test_strength_errors():
    sched = make_schedule("scaled_linear", 1000, beta_start=0.00085, beta_end=0.012)
    lcm, ddim = get_sampler("lcm"), get_sampler("ddim")
    x = jnp.ones((1, 3))
    assert check_strength(ddim, sched, 5, 0.6) == 0.6
    assert img2img_start_step(ddim, sched, 5, 0.6) == 2
    assert "strength" not in sampler_options("lcm")  # a call argument, not a bound option
    assert check_strength(get_sampler("lcm", original_inference_steps=10), sched, 4, 0.45) == 0.45
    # too few distillation timesteps: int(50 * 0.05) = 2 < 4 (diffusers raises as well)
    with pytest.raises(ValueError, match=r"strength=0.05 keeps .* = 2 .*num_steps=4"):
        check_strength(lcm, sched, 4, 0.05)
    with pytest.raises(ValueError, match=r"strength >= 0.4 or num_steps <= 3"):
        check_strength(get_sampler("lcm", original_inference_steps=10), sched, 4, 0.35)
    with pytest.raises(ValueError, match=r"strength >= 0.2901 or num_steps <= 28"):
        check_strength(get_sampler("lcm", original_inference_steps=100), sched, 29, 0.29)
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="strength"):
            check_strength(lcm, sched, 2, bad)
        with pytest.raises(ValueError, match="strength"):
            check_strength(ddim, sched, 2, bad)
    with pytest.raises(ValueError, match="num_steps"):
        check_strength(lcm, sched, 0, 0.5)
    with pytest.raises(ValueError, match="num_steps"):  # the sampler itself, same rule
        lcm(_toy, sched, x, None, num_steps=4, strength=0.05, noise=jnp.zeros((4, 1, 3)))
    with pytest.raises(ValueError, match="strength"):
        lcm(_toy, sched, x, None, num_steps=1, strength=1.5)
    with pytest.raises(ValueError, match="strength"):
        noise_to_img2img(lcm, sched, 4, x, x, 0.05)
    with pytest.raises(ValueError, match="strength=0.1 keeps no step"):
        noise_to_img2img(ddim, sched, 4, x, x, 0.1)
    with pytest.raises(ValueError, match="noise must have x0's shape"):
        noise_to_img2img(lcm, sched, 4, x, jnp.ones((2, 3)), 0.5)
    # strength=1 is text-to-image for both kinds of sampler
    np.testing.assert_array_equal(
        np.asarray(ddim(_toy, sched, x, None, num_steps=3, strength=1.0)),
        np.asarray(ddim(_toy, sched, x, None, num_steps=3)))
    z = jnp.asarray(np.random.default_rng(0).standard_normal((3, 1, 3)), jnp.float32)
    np.testing.assert_array_equal(
        np.asarray(lcm(_toy, sched, x, None, num_steps=3, noise=z, strength=1.0)),
        np.asarray(lcm(_toy, sched, x, None, num_steps=3, noise=z)))
