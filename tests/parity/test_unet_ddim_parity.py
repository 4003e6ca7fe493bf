"""End to end: jaxdiff DDIM around the converted UNet against diffusers' DDIMScheduler loop around
the PyTorch ``UNet2DModel``, from the same initial noise (linear schedule, 1000 training steps,
10 steps, eta 0, "leading" spacing, ``set_alpha_to_one``, no clipping).

Tolerance: relative error ``max|jax - torch| / max|torch|`` on the final sample, float32: per
step the UNet's bound (test_unet_parity's ``unet_rtol``) and the step's roundings (``STEP_ULPS``).
eps is kept smaller than the sample (checked on the way), so each DDIM step is nearly the linear
map ``x -> sqrt(abar_prev / abar_t) x``, which scales the sample and its errors alike: relative
errors add over the steps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from jaxdiff.convert import from_diffusers
from jaxdiff.models import UNet
from jaxdiff.samplers import ddim_sample
from jaxdiff.schedules import make_schedule
from tests.parity.test_unet_parity import rel_err, tiny_unet2d, unet_rtol
from tests.parity.tolerances import STEP_ULPS, ulps, within

NUM_STEPS = 10


@pytest.mark.slow
def test_ddim_with_converted_unet_matches_diffusers():
    model = tiny_unet2d()
    with torch.no_grad():  # keep eps O(1) so that the samples stay O(1)
        model.conv_out.weight.mul_(0.1)
        model.conv_out.bias.mul_(0.1)
    rng = np.random.default_rng(0)
    x_T = rng.standard_normal((3, 3, 8, 8)).astype(np.float32)  # NCHW
    labels = np.array([0, 2, 4])

    sched = DDIMScheduler(
        num_train_timesteps=1000, beta_schedule="linear", clip_sample=False,
        set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading",
    )  # fmt: skip
    sched.set_timesteps(NUM_STEPS)
    x = torch.from_numpy(x_T)
    y = torch.from_numpy(labels)
    with torch.no_grad():
        for t in sched.timesteps:
            eps = model(x, t, class_labels=y).sample
            assert eps.abs().max() <= x.abs().max()  # the tolerance's premise (docstring)
            x = sched.step(eps, t, x, eta=0.0).prev_sample
    ref = x.numpy()

    config, params = from_diffusers(model)
    unet = UNet(config)

    @jax.jit
    def sample(params, x_T, labels):
        def model_fn(x, t):
            return unet.apply({"params": params}, x, t, labels=labels)

        return ddim_sample(
            model_fn, make_schedule("linear", 1000), x_T, None, num_steps=NUM_STEPS, eta=0.0,
            spacing="leading", set_alpha_to_one=True, prediction_type="eps", clip_x0=None,
        )  # fmt: skip

    out = sample(params, jnp.asarray(x_T.transpose(0, 2, 3, 1)), jnp.asarray(labels))
    out = np.asarray(out).transpose(0, 3, 1, 2)
    err = rel_err(out, ref)
    print(f"DDIM {NUM_STEPS} steps: relative error {err:.2e} (max |ref| {np.abs(ref).max():.3g})")
    assert np.isfinite(out).all()
    within(err, NUM_STEPS * (unet_rtol(model, 999) + ulps(STEP_ULPS)), "relative error")
