r"""Score-based generative modelling with SDEs in one dimension, end to end (the score-SDE
tutorial of Song et al. 2021 on a two-mode Gaussian mixture).

    python -m experiments.score_1d --out_dir docs/assets
    python -m experiments.score_1d --sde vp --train_steps 2000 --out_dir /tmp/score_1d

1. Forward trajectories of the SDE (``--sde``: ``tutorial_ve``, ``ve``, ``vp`` or ``subvp``)
   from the data, over the exact marginal densities ``p_t`` (the mixture's are closed form).
2. A :class:`jaxdiff.sde.ScoreMLP` trained with denoising score matching
   (:func:`jaxdiff.losses.dsm_loss`, fresh mixture samples each step, Adam).
3. Sampling with the learned score: Euler-Maruyama, predictor-corrector (reverse diffusion +
   Langevin) and the probability-flow ODE (``--ode_solver``: diffrax Tsit5 by default); the
   exact score with PC as a reference. Each sample set is compared with the mixture by the
   Kolmogorov-Smirnov statistic.
4. The learned density, ``exp(log p)`` from the ODE likelihood (:func:`jaxdiff.sde.ode_likelihood`,
   exact divergence in 1-D) on a grid, against the true density; the mean negative
   log-likelihood of held-out samples under both.

Writes ``OUT_DIR/score_1d_forward.png``, ``score_1d_samples.png``, ``score_1d_density.png`` and
``score_1d_summary.txt`` (the printed summary; also returned by :func:`main` as a dict). Plots need
matplotlib (``pip install jaxdiff[plots]``).
"""

from __future__ import annotations

import math
import os
import time
from functools import partial
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags

from experiments import cli
from experiments.cli import ConfigError
from jaxdiff.sde import (
    SDE_TYPES,
    ScoreMLP,
    TutorialVESDE,
    VESDE,
    ode_likelihood,
    ode_sample,
    pc_sample,
)
from jaxdiff.losses import dsm_loss

PROG = "python -m experiments.score_1d"

__all__ = ["WEIGHTS", "MEANS", "STDS", "make_sde", "mixture_sample", "mixture_logpdf",
           "mixture_cdf", "marginal_score", "ks_statistic", "train", "main", "cli_main"]

WEIGHTS = np.array([0.3, 0.7])
MEANS = np.array([-2.0, 1.5])
STDS = np.array([0.4, 0.6])


def _define(fv: flags.FlagValues, argv: list) -> None:
    del argv
    flags.DEFINE_enum("sde", "tutorial_ve", list(SDE_TYPES), "the forward SDE", flag_values=fv)
    flags.DEFINE_integer("train_steps", 10000, "DSM training steps", flag_values=fv)
    flags.DEFINE_integer("batch_size", 512, "training batch size", flag_values=fv)
    flags.DEFINE_float("learning_rate", 2e-3, "Adam's peak learning rate (cosine decay)",
                       flag_values=fv)
    flags.DEFINE_float("ema_decay", 0.999, "EMA of the parameters (0: none), used for sampling",
                       flag_values=fv)
    flags.DEFINE_enum("ode_solver", "tsit5", ["tsit5", "dopri5", "rk4"],
                      "probability-flow ODE solver (sampling and likelihood); rk4 takes "
                      "--sample_steps / 5 steps", flag_values=fv)
    flags.DEFINE_integer("num_samples", 5000, "samples per sampler", flag_values=fv)
    flags.DEFINE_integer("sample_steps", 500, "steps of the SDE samplers", flag_values=fv)
    flags.DEFINE_integer("grid_points", 161, "grid of the density plot", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "seed of data, init, training and sampling", flag_values=fv)
    flags.DEFINE_string("out_dir", "score_1d_out", "where the PNGs and the summary go",
                        flag_values=fv)


def make_sde(name: str, n: int):
    """The forward SDE ``name`` with ``n`` discretisation steps (the tutorial's ``sigma = 25``;
    VE from 0.01 to 10)."""
    if name == "tutorial_ve":
        return TutorialVESDE(sigma=25.0, N=n)
    if name == "ve":
        return VESDE(sigma_min=0.01, sigma_max=10.0, N=n)
    return SDE_TYPES[name](N=n)


@partial(jax.jit, static_argnums=1)
def mixture_sample(key: jax.Array, n: int) -> jax.Array:
    """``[n, 1]`` draws from the two-mode mixture."""
    k1, k2 = jax.random.split(key)
    comp = jax.random.choice(k1, 2, (n,), p=jnp.asarray(WEIGHTS))
    z = jax.random.normal(k2, (n,))
    return (jnp.asarray(MEANS)[comp] + jnp.asarray(STDS)[comp] * z)[:, None]


def _marginal_logpdf(sde, x, t):
    """``log p_t(x)`` of the mixture under ``sde`` for ``x [..]`` and scalar-or-broadcast ``t``."""
    c, std = sde.marginal_coeffs(t)
    c, std = c[..., None], std[..., None]
    var = c**2 * jnp.asarray(STDS) ** 2 + std**2
    comp = (jnp.log(jnp.asarray(WEIGHTS)) - 0.5 * jnp.log(2 * jnp.pi * var)
            - (x[..., None] - c * jnp.asarray(MEANS)) ** 2 / (2 * var))
    return jax.nn.logsumexp(comp, axis=-1)


def mixture_logpdf(x: np.ndarray) -> np.ndarray:
    """The data density's log, elementwise."""
    x = np.asarray(x, np.float64)[..., None]
    comp = np.log(WEIGHTS) - 0.5 * np.log(2 * np.pi * STDS**2) - (x - MEANS) ** 2 / (2 * STDS**2)
    return np.logaddexp.reduce(comp, axis=-1)


def mixture_cdf(x: np.ndarray) -> np.ndarray:
    from math import erf

    x = np.asarray(x, np.float64)
    z = (x[..., None] - MEANS) / (STDS * math.sqrt(2.0))
    return np.sum(WEIGHTS * 0.5 * (1.0 + np.vectorize(erf)(z)), axis=-1)


def marginal_score(sde):
    """The exact score ``score_fn(x [B, 1], t [B])`` of the mixture under ``sde``."""
    grad = jax.grad(lambda x, t: _marginal_logpdf(sde, x, t))
    return lambda x, t: jax.vmap(grad)(x[:, 0], t)[:, None]


def ks_statistic(samples: np.ndarray) -> float:
    """One-sample Kolmogorov-Smirnov statistic of ``samples`` against the mixture's CDF."""
    x = np.sort(np.asarray(samples, np.float64).ravel())
    n = x.size
    cdf = mixture_cdf(x)
    return float(max(np.max(np.arange(1, n + 1) / n - cdf), np.max(cdf - np.arange(n) / n)))


def train(sde, key: jax.Array, *, steps: int, batch_size: int, learning_rate: float,
          ema_decay: float = 0.999, log_every: int = 500):
    """Trains a :class:`ScoreMLP` with DSM on fresh mixture samples; returns ``(net, params,
    losses)`` with ``params`` the EMA (``ema_decay`` 0: the last) and ``losses`` the mean loss of
    each ``log_every``-step chunk."""
    net = ScoreMLP(sde=sde, features=(128, 128, 128), embed_dim=64, data_std=1.7)
    k_init, k_train = jax.random.split(key)
    params = jax.jit(net.init)(k_init, jnp.zeros((1, 1)), jnp.ones((1,)))["params"]
    opt = optax.chain(optax.clip_by_global_norm(1.0),
                      optax.adamw(optax.cosine_decay_schedule(learning_rate, max(steps, 1)),
                                  weight_decay=0.0))
    state = jax.jit(lambda p: (opt.init(p), p))(params)  # (optimizer state, EMA params)

    def apply(p, x_t, t, cond):
        del cond
        return net.apply({"params": p}, x_t, t)

    def step(carry, i):
        params, (state, ema) = carry
        k = jax.random.fold_in(k_train, i)
        x0 = mixture_sample(jax.random.fold_in(k, 0), batch_size)
        loss, grads = jax.value_and_grad(
            lambda p: dsm_loss(apply, p, sde, x0, jax.random.fold_in(k, 1))[0])(params)
        updates, state = opt.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        ema = optax.incremental_update(params, ema, 1.0 - ema_decay)
        return (params, (state, ema)), loss

    @jax.jit
    def chunk(params, state, start):
        (params, state), losses = jax.lax.scan(step, (params, state),
                                               start + jnp.arange(log_every))
        return params, state, jnp.mean(losses)

    losses = []
    for start in range(0, steps, log_every):
        params, state, loss = chunk(params, state, start)
        losses.append(float(loss))
    return net, state[1], losses


def _plots(out_dir, sde, paths, ts, samples, grid, learned_logp):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = {}
    # forward trajectories over the exact marginal densities
    fig, ax = plt.subplots(figsize=(8, 4), dpi=100)
    lim = float(np.percentile(np.abs(paths[-1]), 99)) * 1.1
    xs = np.linspace(-lim, lim, 300)
    tt = np.linspace(ts[0], ts[-1], 200)
    dens = np.exp(np.asarray(jax.jit(lambda x, t: _marginal_logpdf(sde, x, t))(
        jnp.asarray(xs)[None, :], jnp.asarray(tt, jnp.float32)[:, None])))
    ax.pcolormesh(tt, xs, np.log(dens.T + 1e-6), cmap="Blues", shading="auto")
    ax.plot(ts, paths[:, :40], lw=0.6, color="tab:red", alpha=0.7)
    ax.set(xlabel="t", ylabel="x(t)", title=f"Forward SDE trajectories ({type(sde).__name__}) "
           "over log p_t")
    files["forward"] = os.path.join(out_dir, "score_1d_forward.png")
    fig.tight_layout()
    fig.savefig(files["forward"])
    plt.close(fig)

    # samples of each sampler against the true density
    x = np.linspace(-4.5, 4.5, 400)
    fig, axes = plt.subplots(1, len(samples), figsize=(4 * len(samples), 3.2), dpi=100,
                             sharey=True)
    for ax, (name, s) in zip(axes, samples.items()):
        ax.hist(np.asarray(s).ravel(), bins=80, range=(-4.5, 4.5), density=True, alpha=0.6)
        ax.plot(x, np.exp(mixture_logpdf(x)), color="k", lw=1.2)
        ax.set(title=name, xlabel="x")
    axes[0].set(ylabel="density")
    fig.tight_layout()
    files["samples"] = os.path.join(out_dir, "score_1d_samples.png")
    fig.savefig(files["samples"])
    plt.close(fig)

    # learned vs true density
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(x, np.exp(mixture_logpdf(x)), color="k", lw=1.5, label="true p_0")
    ax.plot(grid, np.exp(learned_logp), color="tab:orange", lw=1.5, ls="--",
            label="learned (probability-flow ODE likelihood)")
    ax.set(xlabel="x", ylabel="density", title="Learned vs true density")
    ax.legend(fontsize=8)
    fig.tight_layout()
    files["density"] = os.path.join(out_dir, "score_1d_density.png")
    fig.savefig(files["density"])
    plt.close(fig)
    return files


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Parses ``argv`` (without the program name), runs the four stages, writes the PNGs and the
    summary; returns the summary as a dict (KS statistics, NLLs, losses, file paths).

    Raises:
      ConfigError: an invalid flag value.
    """
    fv = cli.parse_flags(_define, [] if argv is None else argv, PROG, __doc__)
    for name, minimum in (("train_steps", 1), ("batch_size", 1), ("num_samples", 10),
                          ("sample_steps", 2), ("grid_points", 2)):
        if getattr(fv, name) < minimum:
            raise ConfigError(f"--{name} must be >= {minimum}, got {getattr(fv, name)}")
    if not fv.learning_rate > 0:
        raise ConfigError(f"--learning_rate must be > 0, got {fv.learning_rate}")
    if not 0 <= fv.ema_decay < 1:
        raise ConfigError(f"--ema_decay must be in [0, 1), got {fv.ema_decay}")
    os.makedirs(fv.out_dir, exist_ok=True)
    t_start = time.time()
    n_steps = fv.sample_steps
    if fv.sde in ("vp", "subvp") and n_steps <= 20:
        raise ConfigError(f"--sample_steps must be > 20 (beta_max) for --sde {fv.sde}, got "
                          f"{n_steps}")
    sde = make_sde(fv.sde, n_steps)
    key = jax.random.key(fv.seed)
    eps = 1e-5 if fv.sde in ("ve", "tutorial_ve") else 1e-3

    # 1. forward trajectories (Euler-Maruyama, dt = T / N)
    x0 = mixture_sample(jax.random.fold_in(key, 0), 200)
    ts = np.linspace(0.0, sde.T, n_steps + 1)

    def fwd(x, i):
        t = jnp.asarray(ts)[i]
        drift, g = sde.sde(x, jnp.full((x.shape[0],), t))
        z = jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, 1), i), x.shape)
        x = x + drift * (sde.T / n_steps) + g[:, None] * math.sqrt(sde.T / n_steps) * z
        return x, x[:, 0]

    _, path = jax.jit(lambda x: jax.lax.scan(fwd, x, jnp.arange(n_steps)))(x0)
    paths = np.concatenate([np.asarray(x0)[None, :, 0], np.asarray(path)])

    # 2. training
    t0 = time.time()
    net, params, losses = train(sde, jax.random.fold_in(key, 2), steps=fv.train_steps,
                                batch_size=fv.batch_size, learning_rate=fv.learning_rate,
                                ema_decay=fv.ema_decay, log_every=min(500, fv.train_steps))
    train_s = time.time() - t0

    def learned(x, t):
        return net.apply({"params": params}, x, t)

    # 3. sampling
    n = fv.num_samples
    x_T = jax.jit(sde.prior_sampling, static_argnums=1)(jax.random.fold_in(key, 3), (n, 1))
    k_s = jax.random.fold_in(key, 4)
    pc = dict(predictor="reverse_diffusion", corrector="langevin", snr=0.16, eps=eps)
    samples, nfe = {}, {}
    samples["exact score, PC"] = jax.jit(lambda x: pc_sample(marginal_score(sde), sde, x, k_s,
                                                             **pc))(x_T)
    samples["learned, Euler-Maruyama"] = jax.jit(lambda x: pc_sample(
        learned, sde, x, k_s, predictor="euler_maruyama", corrector="none", eps=eps))(x_T)
    samples["learned, PC"] = jax.jit(lambda x: pc_sample(learned, sde, x, k_s, **pc))(x_T)
    ode_kw = dict(solver=fv.ode_solver, num_steps=max(1, n_steps // 5), eps=eps)
    x_ode, stats = jax.jit(lambda x: ode_sample(learned, sde, x, return_stats=True,
                                                **ode_kw))(x_T)
    samples[f"learned, ODE ({fv.ode_solver})"] = x_ode
    nfe["ode_steps"] = int(stats["num_steps"])
    ks = {name: ks_statistic(np.asarray(s)) for name, s in samples.items()}
    below0 = {name: float(np.mean(np.asarray(s) < 0)) for name, s in samples.items()}

    # 4. likelihoods
    lik = jax.jit(lambda x: ode_likelihood(learned, sde, x, None, probe="exact",
                                           **ode_kw).logp)
    grid = np.linspace(-4.5, 4.5, fv.grid_points)
    learned_logp = np.asarray(lik(jnp.asarray(grid, jnp.float32)[:, None]))
    held_out = mixture_sample(jax.random.fold_in(key, 5), min(n, 2000))
    nll_learned = -float(jnp.mean(lik(held_out)))
    nll_true = -float(np.mean(mixture_logpdf(np.asarray(held_out)[:, 0])))

    files = {}
    try:
        files = _plots(fv.out_dir, sde, paths, ts, samples, grid, learned_logp)
    except ImportError:
        print("matplotlib is not installed (pip install jaxdiff[plots]): no PNGs written")
    ks_crit = 1.358 / math.sqrt(n)
    true_below0 = float(mixture_cdf(np.array([0.0]))[0])
    lines = [
        f"score_1d: {type(sde).__name__}, ScoreMLP(128, 128, 128) trained {fv.train_steps} steps "
        f"(batch {fv.batch_size}, Adam {fv.learning_rate:g} cosine, EMA {fv.ema_decay:g}) in "
        f"{train_s:.1f} s; DSM loss "
        f"first/last chunk {losses[0]:.4f} / {losses[-1]:.4f}",
        f"samples: n = {n}, SDE samplers {n_steps} steps, eps = {eps:g}; Kolmogorov-Smirnov "
        f"statistic against the true mixture (5% critical value {ks_crit:.4f}); fraction below 0 "
        f"(true {true_below0:.3f}):",
        *[f"  {name:<26} KS {ks[name]:.4f}   below 0: {below0[name]:.3f}" for name in samples],
        f"  probability-flow ODE: {nfe['ode_steps']} {fv.ode_solver} steps"
        + (" (rtol = atol = 1e-5)" if fv.ode_solver != "rk4" else ""),
        f"held-out NLL (nats, {held_out.shape[0]} samples): true density {nll_true:.4f}, learned "
        f"(ODE likelihood, exact divergence) {nll_learned:.4f}",
        f"total {time.time() - t_start:.1f} s",
    ]
    text = "\n".join(lines)
    print(text)
    summary_path = os.path.join(fv.out_dir, "score_1d_summary.txt")
    with open(summary_path, "w") as f:
        f.write(text + "\n")
    return {"ks": ks, "below0": below0, "true_below0": true_below0, "ks_critical_5pct": ks_crit,
            "losses": losses, "nll_true": nll_true, "nll_learned": nll_learned,
            "ode_steps": nfe["ode_steps"], "files": {**files, "summary": summary_path},
            "learned_logp": learned_logp, "grid": grid}


def cli_main(argv: Optional[Sequence[str]] = None) -> None:
    """``python -m experiments.score_1d``: :func:`main` with errors as one line, exit 0."""
    cli.run(main, argv)


if __name__ == "__main__":
    cli_main()
