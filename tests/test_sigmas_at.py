"""``jaxdiff.samplers.sigmas.train_sigmas`` is ``jaxdiff.samplers.timesteps.sigmas_at`` at every
training step in float32 arithmetic: the same numbers, bit for bit, as the float32 formula it
replaced (diffusers' sigmas), and ``sigmas_at``'s own float64 default unchanged."""

import jax
import numpy as np
import pytest

from jaxdiff.samplers.sigmas import train_sigmas
from jaxdiff.samplers.timesteps import sigmas_at
from jaxdiff.schedules import BETA_SCHEDULES, make_schedule

SCHEDULES = [(name, T, False) for name in sorted(BETA_SCHEDULES) for T in (10, 1000)]
SCHEDULES += [("scaled_linear", 1000, True)]   # zero terminal SNR: the last sigma is inf


@pytest.mark.parametrize("name, T, zero_snr", SCHEDULES)
def test_train_sigmas_is_sigmas_at_in_float32(name, T, zero_snr):
    sched = make_schedule(name, T, rescale_to_zero_terminal_snr=zero_snr)
    acp = np.asarray(sched.alphas_cumprod, np.float32)
    with np.errstate(divide="ignore"):
        want = (((1 - acp) / acp) ** np.float32(0.5)).astype(np.float64)  # the former formula
        want64 = np.sqrt((1 - acp.astype(np.float64)) / acp.astype(np.float64))
    got = train_sigmas(sched)
    assert got.dtype == np.float64 and got.shape == (T,)
    np.testing.assert_array_equal(got, want)
    ts = np.array([T - 1, T // 2, 0])
    np.testing.assert_array_equal(sigmas_at(sched, ts), want64[ts])   # default: float64
    np.testing.assert_array_equal(sigmas_at(sched, ts, host_dtype=np.float32), want[ts])
    assert np.isinf(got[-1]) == zero_snr


def test_sigmas_at_traced_and_train_sigmas_concrete_only():
    sched = make_schedule("linear", 100)
    ts = np.array([99, 50, 0])
    traced = jax.jit(lambda s: sigmas_at(s, ts))(sched)
    np.testing.assert_allclose(np.asarray(traced), sigmas_at(sched, ts), rtol=1e-6)
    with pytest.raises(jax.errors.TracerArrayConversionError):
        jax.jit(train_sigmas)(sched)
