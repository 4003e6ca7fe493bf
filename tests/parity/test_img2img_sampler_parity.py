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
]


def _toy(x, t):
    return 0.3 * x + 0.001 * t.reshape((-1,) + (1,) * (x.ndim - 1))


@pytest.mark.parametrize("cls,extra", CASES)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_tail_matches_diffusers_img2img(cls, extra, prediction_type):
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
    out = sampler(_toy, schedule, x_s, None, num_steps=n, start_step=s)
    np.testing.assert_allclose(np.asarray(out), ref, atol=5e-5, rtol=1e-4)


def test_start_step_zero_is_the_full_run_and_errors():
    sched = make_schedule("linear", 100)
    x = jnp.ones((1, 3))
    for name in ("ddim", "dpm_solver", "euler"):
        s = get_sampler(name)
        np.testing.assert_array_equal(np.asarray(s(_toy, sched, x, None, num_steps=5)),
                                      np.asarray(s(_toy, sched, x, None, num_steps=5,
                                                   start_step=0)))
        with pytest.raises(ValueError, match="start_step"):
            s(_toy, sched, x, None, num_steps=5, start_step=5)
    with pytest.raises(ValueError, match="start_step.*'heun'"):
        get_sampler("heun")(_toy, sched, x, None, num_steps=5, start_step=2)
    with pytest.raises(ValueError, match="image-to-image"):
        noise_to_start(get_sampler("unipc"), sched, 5, 1, x, x)
    with pytest.raises(ValueError, match="strength"):
        strength_start_step(4, 0.1)
    with pytest.raises(ValueError, match="strength"):
        strength_start_step(4, 1.5)
    # a stochastic tail takes noise for the steps that run
    anc = get_sampler("euler_ancestral")
    out = anc(_toy, sched, x, None, num_steps=5, start_step=3, noise=jnp.zeros((2, 1, 3)))
    assert out.shape == (1, 3)
