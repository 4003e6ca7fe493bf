"""TCD sampling against diffusers' ``TCDScheduler`` (PyTorch, float32), whole trajectories.

As test_lcm_parity.py: both sides run the stand-in model of test_sampler_parity.py (the
near-exact denoiser of ``N(0, 0.25 I)`` data), diffusers' ``randn_tensor`` is patched to return
``noise[step_index]`` (it draws on every step but the last, and only when ``eta > 0``), and the
scheduler gets jaxdiff's ``alphas_cumprod``. Grids are compared exactly (timesteps, and the
step after the last at ``t = 0``).

Tolerance: every step's sample and predicted x0 within ``tolerances.stepwise_atol``: an eps
model's x0, ``(x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)``, divides the float32 rounding of that
cancellation by ``sqrt(abar_t)``; the step carries it into the next sample with ``sqrt(abar_s)``
(``x_s``) times ``sqrt(abar_prev / abar_s)`` (the re-noising), i.e. ``sqrt(abar_prev) /
sqrt(abar_t)`` when re-noised and ``sqrt(abar_s) / sqrt(abar_t)`` on the last step.
"""

import numpy as np
import pytest
import torch
from diffusers import TCDScheduler
from diffusers.schedulers import scheduling_tcd

from jaxdiff.samplers import get_sampler
from jaxdiff.samplers.tcd import tcd_sample, tcd_timesteps
from jaxdiff.schedules import make_schedule
from tests.parity.test_sampler_parity import DIFFUSERS_PRED, standin
from tests.parity.tolerances import stepwise_atol, within

T = 1000
SHAPE = (2, 8, 8, 3)
SD = dict(beta_start=0.00085, beta_end=0.012)
SCHED = make_schedule("scaled_linear", T, **SD)


@pytest.mark.parametrize("num_steps, orig", [(1, 50), (2, 50), (4, 50), (8, 50), (7, 13)])
def test_timesteps_match(num_steps, orig):
    ref = TCDScheduler(num_train_timesteps=T, original_inference_steps=orig)
    ref.set_timesteps(num_steps)
    grid = tcd_timesteps(SCHED, num_steps, original_inference_steps=orig)
    np.testing.assert_array_equal(grid.timesteps, ref.timesteps.numpy())
    np.testing.assert_array_equal(grid.prev_timesteps, [*grid.timesteps[1:], 0])


CASES = [  # pred, num_steps, eta, original_inference_steps
    ("eps", 4, 0.3, 50),
    ("eps", 8, 1.0, 50),
    ("eps", 4, 0.0, 50),  # deterministic: DDIM on the TCD grid, ending at t = 0
    ("v", 2, 0.7, 50),
    ("x0", 6, 0.3, 20),
    ("eps", 1, 0.3, 50),  # one step: no noise
]


@pytest.mark.parametrize("pred, n, eta, orig", CASES)
def test_trajectory_matches_tcd_scheduler(pred, n, eta, orig, monkeypatch):
    rng = np.random.default_rng(n)
    x_T = rng.standard_normal(SHAPE).astype(np.float32)
    noise = rng.standard_normal((n, *SHAPE)).astype(np.float32)
    ref = TCDScheduler(num_train_timesteps=T, original_inference_steps=orig,
                       prediction_type=DIFFUSERS_PRED[pred], **SD)
    ref.alphas_cumprod = torch.from_numpy(np.array(SCHED.alphas_cumprod))
    ref.set_timesteps(n)
    calls = []

    def randn(shape, **kw):
        calls.append(ref.step_index)
        return torch.from_numpy(noise[ref.step_index])

    monkeypatch.setattr(scheduling_tcd, "randn_tensor", randn)
    x, ref_xs = torch.from_numpy(x_T), [x_T]
    for t in ref.timesteps:
        out = standin(torch, x, torch.full((SHAPE[0],), int(t)), ref.alphas_cumprod, pred)
        x = ref.step(out, t, x, eta=eta).prev_sample
        ref_xs.append(x.numpy())
    assert calls == (list(range(n - 1)) if eta > 0 else [])

    acp = SCHED.alphas_cumprod

    def model(x, t):
        import jax.numpy as jnp

        return standin(jnp, x, t, acp, pred)

    _, xs, _ = tcd_sample(model, SCHED, x_T, None, num_steps=n, original_inference_steps=orig,
                          eta=eta, prediction_type=pred, noise=noise, return_trajectory=True)
    grid = tcd_timesteps(SCHED, n, original_inference_steps=orig)
    a = np.asarray(acp, np.float64)
    a_t, a_p = a[grid.timesteps], a[grid.prev_timesteps]
    s = np.floor(np.float32(1 - eta) * grid.prev_timesteps.astype(np.float32)).astype(int)
    renoised = (eta > 0) & (np.arange(n) < n - 1)
    gain = np.where(renoised, np.sqrt(a_p), np.sqrt(a[s])) / np.sqrt(a_t)
    gains = (1 / np.sqrt(a_t), gain) if pred == "eps" else (np.zeros(n), np.zeros(n))
    tol_x, _ = stepwise_atol(max(np.abs(x_T).max(), np.abs(noise).max()), *gains)
    err = np.abs(np.asarray(xs, np.float64) - np.stack(ref_xs)).max(axis=(1, 2, 3, 4))
    within(err, np.concatenate([[0.0], tol_x]), "samples")


def test_config_and_registry():
    """``TCDScheduler`` configs map onto the ``tcd`` sampler; ``eta`` (not a config key) keeps
    the sampler's default unless given."""
    from jaxdiff.convert import sampler_from_diffusers_config

    s = sampler_from_diffusers_config(dict(_class_name="TCDScheduler", original_inference_steps=20,
                                           prediction_type="v_prediction", clip_sample=True))
    assert s.name == "tcd" and s.options == dict(original_inference_steps=20,
                                                 prediction_type="v")
    assert s.effective_options["eta"] == 0.3 and s.stochastic
    assert not get_sampler("tcd", eta=0.0).stochastic
    with pytest.raises(ValueError, match="eta"):
        get_sampler("tcd", eta=1.5).check(SCHED, 4)
