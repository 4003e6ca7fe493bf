"""Samplers over the tail of their grid (``start_step``, image-to-image) against diffusers'
img2img recipe: ``set_timesteps``, keep ``timesteps[t_start * order:]``, ``set_begin_index``,
``add_noise`` at the first kept timestep, then the scheduler loop. A linear toy model, float32."""

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
    get_sampler,
    noise_to_start,
    strength_start_step,
)
from jaxdiff.schedules import make_schedule  # noqa: E402

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


@pytest.mark.parametrize("cls,extra", CASES)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_tail_matches_diffusers_img2img(cls, extra, prediction_type, monkeypatch):
    n, strength = 8, 0.6
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
    assert s == t_start
    x_s = noise_to_start(sampler, schedule, n, s, jnp.asarray(x0), jnp.asarray(noise))
    np.testing.assert_allclose(np.asarray(x_s), start_ref, atol=2e-5, rtol=1e-5)
    kwargs = {} if step_noise is None else {"noise": jnp.asarray(step_noise)}
    if step_noise is not None:  # every step of the tail but the last draws (the last: t = 1 > 0
        # for DDPM with steps_offset=1; KDPM2 ancestral adds none on its last step)
        assert len(calls) == (n - s if cls == "DDPMScheduler" else n - s - 1), calls
    out = sampler(_toy, schedule, x_s, None, num_steps=n, start_step=s, **kwargs)
    np.testing.assert_allclose(np.asarray(out), ref, atol=5e-5, rtol=1e-4)


def test_start_step_zero_is_the_full_run_and_errors():
    sched = make_schedule("linear", 100)
    x = jnp.ones((1, 3))
    for name in ("ddim", "dpm_solver", "euler", "unipc", "heun", "kdpm2"):
        s = get_sampler(name)
        np.testing.assert_array_equal(np.asarray(s(_toy, sched, x, None, num_steps=5)),
                                      np.asarray(s(_toy, sched, x, None, num_steps=5,
                                                   start_step=0)))
        with pytest.raises(ValueError, match="start_step"):
            s(_toy, sched, x, None, num_steps=5, start_step=5)
    with pytest.raises(ValueError, match="start_step.*'lcm'"):
        get_sampler("lcm")(_toy, sched, x, None, num_steps=5, start_step=2)
    with pytest.raises(ValueError, match="image-to-image"):
        noise_to_start(get_sampler("lcm"), sched, 5, 1, x, x)
    with pytest.raises(ValueError, match="strength"):
        strength_start_step(4, 0.1)
    with pytest.raises(ValueError, match="strength"):
        strength_start_step(4, 1.5)
    # a stochastic tail takes noise for the steps that run
    anc = get_sampler("euler_ancestral")
    out = anc(_toy, sched, x, None, num_steps=5, start_step=3, noise=jnp.zeros((2, 1, 3)))
    assert out.shape == (1, 3)
