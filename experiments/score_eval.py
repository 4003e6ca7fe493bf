"""Evaluating a trained score-SDE MNIST run (:func:`experiments.score_mnist.load_run`): samples by
predictor-corrector and by the probability-flow ODE (fixed-step or adaptive) with their exact
number of score evaluations, and bits/dim of test images from the ODE likelihood.
``experiments.eval_score_mnist`` is the command line.

The number of function evaluations (NFE) is counted, not derived: the score function calls a
``jax.debug.callback`` once per evaluation of the batch, so an adaptive solver's rejected steps
and its initial step-size search are included. NFE is per batch (every image in a batch sees the
same number; an adaptive solve controls the error of the whole batch jointly).
"""

from __future__ import annotations

import functools
import math
import threading
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from experiments.evaluation import log
from jaxdiff.compile_options import cpu_compiler_options
from jaxdiff.sde import (ADAPTIVE_SOLVERS, FIXED_SOLVERS, bits_per_dim, ode_likelihood,
                         ode_sample, pc_sample, uniform_dequantize)

__all__ = ["EvalCounter", "make_sampler", "sample_many", "ode_bits_per_dim", "to_uint8",
           "class_entropy_bits"]


class EvalCounter:
    """Counts score evaluations at run time (thread-safe); :meth:`wrap` a score function."""

    def __init__(self):
        self.count = 0
        self._lock = threading.Lock()

    def _tick(self):
        with self._lock:
            self.count += 1

    def wrap(self, score_fn: Callable) -> Callable:
        def counted(x, t):
            jax.debug.callback(self._tick)
            return score_fn(x, t)

        return counted

    def take(self) -> int:
        """The count since the last call, and reset."""
        jax.effects_barrier()
        with self._lock:
            n, self.count = self.count, 0
        return n


def make_sampler(run, method: str, *, num_steps: int = 500, solver: str = "rk4",
                 rtol: float = 1e-3, atol: float = 1e-3, counter: Optional[EvalCounter] = None,
                 max_steps: int = 4096) -> Callable[[jax.Array, int], jax.Array]:
    """``sample(key, n) -> images [n, 28, 28, C]`` in ``[-1, 1]`` (clipped) from ``run``'s EMA
    params, one jitted program per ``n``.

    Args:
      run: a :class:`experiments.score_mnist.ScoreRun`.
      method: ``"pc"`` (``run.config.sampling``'s predictor, corrector, snr and corrector steps,
        with ``num_steps`` steps) or ``"ode"`` (``solver``: fixed-step with ``num_steps``, or
        adaptive with ``rtol`` / ``atol``).
      counter: counts the score evaluations (see the module docstring).

    Raises:
      ValueError: an unknown method or solver.
    """
    if method not in ("pc", "ode"):
        raise ValueError(f"method must be 'pc' or 'ode', got {method!r}")
    if method == "ode" and solver not in FIXED_SOLVERS + ADAPTIVE_SOLVERS:
        raise ValueError(f"solver must be one of {FIXED_SOLVERS + ADAPTIVE_SOLVERS}, got "
                         f"{solver!r}")
    s, sde, model = run.config.sampling, run.sde, run.model
    shape = (28, 28, model.config.in_channels)

    def sample(params, key, n):
        def score_fn(x, t):
            return model.apply({"params": params}, x, t)

        if counter is not None:
            score_fn = counter.wrap(score_fn)
        k_prior, k_sample = jax.random.split(key)
        x_T = sde.prior_sampling(k_prior, (n, *shape))
        if method == "pc":
            x0 = pc_sample(score_fn, sde, x_T, k_sample, predictor=s.predictor,
                           corrector=s.corrector, snr=s.snr,
                           n_corrector_steps=s.n_corrector_steps, eps=s.eps,
                           num_steps=num_steps)
        else:
            x0 = ode_sample(score_fn, sde, x_T, solver=solver, num_steps=num_steps, eps=s.eps,
                            rtol=rtol, atol=atol, max_steps=max_steps, return_stats=False)
        return jnp.clip(x0, -1.0, 1.0)

    fn = jax.jit(sample, static_argnums=2, compiler_options=cpu_compiler_options())
    return functools.partial(fn, run.ema_params)


def sample_many(sample: Callable, key: jax.Array, n: int, batch_size: int,
                counter: Optional[EvalCounter] = None) -> tuple[np.ndarray, dict]:
    """``n`` images from ``sample(key, batch_size)`` calls (chunk ``i`` uses ``fold_in(key, i)``;
    the last chunk is a full batch cut to size: one compilation). Returns ``(images [n, ...],
    info)`` with ``info = {"n", "time_s", "nfe"}`` (``nfe``: per batch, the mean over batches,
    when a ``counter`` counts)."""
    out, nfes, t0 = [], [], time.time()
    if counter is not None:
        counter.take()
    for i, start in enumerate(range(0, n, batch_size)):
        imgs = np.asarray(jax.device_get(sample(jax.random.fold_in(key, i), batch_size)))
        out.append(imgs[:n - start])
        if counter is not None:
            nfes.append(counter.take())
        log(f"  sampled {min(start + batch_size, n)}/{n}")
    info = {"n": int(n), "time_s": round(time.time() - t0, 1)}
    if nfes:
        info["nfe"] = float(np.mean(nfes))
        info["nfe_per_batch"] = [int(v) for v in nfes]
    return np.concatenate(out), info


def to_uint8(images: np.ndarray) -> np.ndarray:
    """``[-1, 1]`` float images on the 8-bit grid (``jaxdiff.data``'s ``u / 127.5 - 1``) back to
    ``uint8`` levels ``0 .. 255``."""
    return np.clip(np.round((np.asarray(images) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def ode_bits_per_dim(run, levels: np.ndarray, key: jax.Array, *, batch_size: int,
                     solver: str = "tsit5", num_steps: int = 100, rtol: float = 1e-5,
                     atol: float = 1e-5, probe: str = "rademacher", eps: float = 1e-5,
                     counter: Optional[EvalCounter] = None) -> dict:
    """Bits/dim of 8-bit images under ``run``'s probability-flow ODE (Song et al. 2021, App. D.2).

    Each image ``levels [n, 28, 28, C]`` (uint8) is dequantised once with uniform noise to
    ``[-1, 1]`` (:func:`jaxdiff.sde.uniform_dequantize`), its ``log p`` is integrated along the
    ODE from ``eps`` to ``T`` with Hutchinson's estimator (one ``probe`` per image)
    (:func:`jaxdiff.sde.ode_likelihood`), and :func:`jaxdiff.sde.bits_per_dim` adds the
    dequantisation offset ``log2(256 / 2) = 7``: an upper bound (in expectation) on the
    discrete negative log-likelihood. Batch ``i`` uses ``fold_in(key, i)``; the last batch is
    padded with copies of its first image (dropped).

    Returns:
      ``{"n", "bpd", "bpd_stderr", "nfe", "time_s", "solver", "probe"}`` (and the solver's
      ``rtol`` / ``atol`` or ``num_steps``);
      ``nfe`` counts evaluations of the score inside the divergence's ``jax.jvp`` (when a
      ``counter`` is given; each costs about a forward and a tangent pass).
    """
    levels = np.asarray(levels)
    if levels.dtype != np.uint8:
        raise ValueError(f"levels must be uint8 images, got dtype {levels.dtype}")
    sde, model = run.sde, run.model
    dims = math.prod(levels.shape[1:])

    def score(params, x, t):
        return model.apply({"params": params}, x, t)

    @functools.partial(jax.jit, compiler_options=cpu_compiler_options())
    def batch_bpd(params, ints, key):
        k_deq, k_probe = jax.random.split(key)
        x = uniform_dequantize(k_deq, ints, num_bins=256, centered=True)
        score_fn = functools.partial(score, params)
        if counter is not None:
            score_fn = counter.wrap(score_fn)
        res = ode_likelihood(score_fn, sde, x, k_probe, probe=probe, eps=eps, solver=solver,
                             num_steps=num_steps, rtol=rtol, atol=atol)
        return bits_per_dim(res.logp, dims)

    totals, nfes, t0 = [], [], time.time()
    if counter is not None:
        counter.take()
    n = len(levels)
    for i, start in enumerate(range(0, n, batch_size)):
        chunk = levels[start:start + batch_size]
        keep = len(chunk)
        chunk = np.concatenate([chunk, np.repeat(chunk[:1], batch_size - keep, 0)])
        bpd = jax.device_get(batch_bpd(run.ema_params, chunk.astype(np.int32),
                                       jax.random.fold_in(key, i)))
        totals.append(np.asarray(bpd)[:keep])
        if counter is not None:
            nfes.append(counter.take())
        log(f"  ODE bits/dim {start + keep}/{n}: running mean "
            f"{np.concatenate(totals).mean():.4f}")
    totals = np.concatenate(totals)
    out = {"n": int(n), "bpd": float(totals.mean()),
           "bpd_stderr": float(totals.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan"),
           "solver": solver, "probe": probe, "time_s": round(time.time() - t0, 1)}
    if solver in ADAPTIVE_SOLVERS:
        out.update(rtol=rtol, atol=atol)
    else:
        out["num_steps"] = num_steps
    if nfes:
        out["nfe"] = float(np.mean(nfes))
    return out


def class_entropy_bits(histogram) -> float:
    """Entropy (bits) of a class histogram (fractions); ``log2(10) = 3.32`` is uniform."""
    p = np.asarray(histogram, np.float64)
    p = p[p > 0] / p.sum()
    return float(-(p * np.log2(p)).sum())
