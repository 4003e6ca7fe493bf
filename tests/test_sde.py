"""jaxdiff.sde against closed forms.

For Gaussian data ``N(mu, s^2)`` every SDE here is linear, so ``p_t = N(c(t) mu, c(t)^2 s^2 +
std(t)^2)`` and its score and log-density are exact (:func:`gauss_score`, :func:`gauss_logp`).

Statistical thresholds (all seeds fixed, so the tests are deterministic; a threshold is what a
correct implementation passes with overwhelming probability):

- sampler moments, ``n = 20000`` samples started from the exact ``p_T``: the mean within
  ``Z = 4.5`` standard errors ``s / sqrt(n)``, the variance within ``Z s^2 sqrt(2 / (n - 1))``
  (4.5% of ``s^2``). Measured worst cases over the 7 PC and 4 ODE cases: 1.4 SE (mean), 1.4 SE
  (variance). Steps are chosen so the discretisation bias stays well inside (Euler-Maruyama at 300
  steps was up to 3.1 SE off); the VE Langevin case uses ``snr = 0.05`` because the corrector's
  own bias grows like ``snr^2`` (unadjusted Langevin with step ``2 snr^2 v`` on ``N(m, v)`` has
  stationary variance ``v / (1 - snr^2)``; at ``snr = 0.16`` the variance was 3.2 SE high);
- Hutchinson probes, ``M = 4000`` probes: the mean estimate within ``Z`` standard errors (from the
  sample variance) of the exact trace; measured within 0.8 SE for both probes;
- DSM and importance sampling: within ``Z`` standard errors of the closed-form expectation;
- the two-mode mixture: one-sample Kolmogorov-Smirnov statistic of ``n = 4000`` samples against
  the exact mixture CDF below ``1.95 / sqrt(n) = 0.031`` (the 0.1% critical value); measured
  0.012 (predictor-corrector, 500 steps) and 0.016 (probability-flow ODE, RK4, 100 steps).

ODE likelihood tolerances (float32): RK4 with 100 steps within ``5e-5`` nats of the exact
log-density (measured 3.3e-6 over the four SDEs), Tsit5 at ``rtol = atol = 1e-5`` within ``1e-3``
(measured 1.8e-5 on VP, 9.2e-5 the worst over the four SDEs; the local tolerance times the ~20-nat
integral, with a margin).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxdiff.sde import (
    CORRECTORS,
    PREDICTORS,
    SDE_TYPES,
    ScoreMLP,
    ScoreUNet,
    SubVPSDE,
    TutorialVESDE,
    VESDE,
    VPSDE,
    bits_per_dim,
    divergence,
    hutchinson_probe,
    ode_encode,
    ode_likelihood,
    ode_sample,
    pc_sample,
    score_from_eps,
    vp_schedule,
)
from jaxdiff.losses import dsm_loss, eps_loss, importance_sample_t, sample_t

Z = 4.5
MU, S = 1.0, 0.5
SDES = {
    "ve": VESDE(sigma_min=0.01, sigma_max=10.0),
    "tutorial_ve": TutorialVESDE(sigma=25.0),
    "vp": VPSDE(),
    "subvp": SubVPSDE(),
}


def gauss_var(sde, t, s):
    c, std = sde.marginal_coeffs(t)
    return c, c**2 * s**2 + std**2


def gauss_score(sde, mu=MU, s=S):
    """The exact score of ``N(mu, s^2)`` data (``mu``, ``s``: scalars or ``[D]``) under ``sde``."""

    def score(x, t):
        c, v = gauss_var(sde, t[:, None], s)
        return -(x - c * mu) / v

    return score


def gauss_logp(sde, x, t, mu=MU, s=S):
    c, v = gauss_var(sde, t, s)
    return jnp.sum(-0.5 * jnp.log(2 * jnp.pi * v) - (x - c * mu) ** 2 / (2 * v), axis=-1)


def exact_p_T(sde, key, n, d=1):
    c, v = gauss_var(sde, jnp.float32(sde.T), S)
    return c * MU + jnp.sqrt(v) * jax.random.normal(key, (n, d))


def assert_moments(x, mu=MU, s=S):
    x = np.asarray(x, np.float64).ravel()
    n = x.size
    mean_se, var_se = s / math.sqrt(n), s**2 * math.sqrt(2.0 / (n - 1))
    assert abs(x.mean() - mu) <= Z * mean_se, (x.mean(), mu, (x.mean() - mu) / mean_se)
    assert abs(x.var(ddof=1) - s**2) <= Z * var_se, (x.var(), s**2, (x.var() - s**2) / var_se)


# ---------------------------------------------------------------------------------------------
# The SDEs


@pytest.mark.parametrize("name", list(SDES))
def test_marginals_solve_the_moment_odes_of_the_sde(name):
    """For ``dx = a(t) x dt + g dw``: ``c' = a c`` and ``(std^2)' = 2 a std^2 + g^2``, checked by
    forward-mode derivatives at interior times (VE as score_sde: std(0) = sigma_min)."""
    sde = SDES[name]
    for t in (0.05, 0.3, 0.7, 0.95):
        t = jnp.float32(t)
        (c, std), (dc, dstd) = jax.jvp(sde.marginal_coeffs, (t,), (jnp.float32(1.0),))
        a = sde.drift(jnp.ones((1, 1)), t[None])[0, 0]
        g = sde.diffusion(t)
        np.testing.assert_allclose(dc, a * c, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(2 * std * dstd, 2 * a * std**2 + g**2, rtol=1e-3)


def test_sdes_are_pytrees_and_validate():
    sde = VPSDE(beta_min=0.2, beta_max=10.0, N=50)
    leaves, treedef = jax.tree.flatten(sde)
    assert leaves == [0.2, 10.0] and jax.tree.unflatten(treedef, leaves) == sde
    f = jax.jit(lambda s, x, t: s.discretize(x, t))
    f(sde, jnp.ones((2, 3)), jnp.full((2,), 0.5))
    f(sde.replace(beta_max=12.0), jnp.ones((2, 3)), jnp.full((2,), 0.5))  # same static N
    assert f._cache_size() == 1
    assert sde.replace(N=70).N == 70
    for bad, match in [(lambda: VESDE(sigma_min=1.0, sigma_max=0.5), "sigma_min"),
                       (lambda: VESDE(sigma_min=-1.0), "sigma_min"),
                       (lambda: VPSDE(beta_min=2.0, beta_max=1.0), "beta_min"),
                       (lambda: SubVPSDE(N=0), "N"), (lambda: TutorialVESDE(sigma=1.0), "sigma"),
                       (lambda: VPSDE(N=2.5), "N")]:
        with pytest.raises(ValueError, match=match):
            bad()
    assert set(SDE_TYPES) == set(SDES)


@pytest.mark.parametrize("name", list(SDES))
def test_prior_sampling_and_logp(name):
    sde = SDES[name]
    z = sde.prior_sampling(jax.random.key(0), (4000, 3))
    std = float(sde.prior_std)
    assert abs(float(jnp.std(z)) / std - 1) < Z * math.sqrt(1 / (2 * z.size))
    ref = stats.norm.logpdf(np.asarray(z[:5]), scale=std).sum(-1)
    np.testing.assert_allclose(np.asarray(sde.prior_logp(z[:5])), ref, rtol=1e-5)


def test_vp_chain_is_jaxdiffs_linear_schedule():
    """VP's discrete chain has ``make_schedule("linear", N)``'s betas ``beta_min / N + k / (N - 1)
    (beta_max - beta_min) / N``, indexed by ``floor(t (N - 1))``; its ``log alphas_cumprod`` follow
    the continuous ``-int_0^t beta`` at ``t = (k + 1) / N`` to first order in ``1 / N``."""
    n = 1000
    sde, sched = VPSDE(beta_min=0.1, beta_max=20.0, N=n), vp_schedule(VPSDE(N=n))
    np.testing.assert_allclose(np.asarray(sde.discrete_betas), np.asarray(sched.betas), rtol=1e-6)
    k = np.array([0, 1, 499, 998, 999])
    t = jnp.asarray(k / (n - 1), jnp.float32)
    np.testing.assert_array_equal(np.asarray(sde.timestep_index(t)), k)
    x = jax.random.normal(jax.random.key(0), (5, 3))
    f, G = sde.discretize(x, t)
    np.testing.assert_allclose(np.asarray(G) ** 2, np.asarray(sched.betas)[k], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(f),
                               (np.sqrt(np.asarray(sched.alphas)[k])[:, None] - 1) * np.asarray(x),
                               rtol=1e-4, atol=1e-7)
    errs = []
    for m in (n, 4 * n):
        s_m = VPSDE(N=m)
        lmc = np.asarray(s_m.log_mean_coeff(jnp.arange(1, m + 1, dtype=jnp.float32) / m))
        errs.append(np.abs(np.log(np.asarray(vp_schedule(s_m).alphas_cumprod)) - 2 * lmc).max())
        # the second-order term sum(beta^2) / 2 of log(1 - beta), plus the grids' offset
        assert errs[-1] <= (20.0**2 / 6 + 20.0) / m, errs
    assert errs[1] < errs[0] / 3, errs  # first order in 1 / N


def test_vp_ancestral_predictor_is_jaxdiffs_ddpm_step():
    """With ``score = -eps / sqrt(1 - alphas_cumprod_i)``, VP's ancestral step is DDPM's
    (``variance_type="fixed_large"``) on :func:`vp_schedule` at index ``i = floor(t (N - 1))``."""
    from jaxdiff.samplers import ddpm_step
    from jaxdiff.sde import ancestral_predictor

    sde = VPSDE(N=100)
    sched = vp_schedule(sde)
    key = jax.random.key(0)
    x, eps, z = (jax.random.normal(jax.random.fold_in(key, i), (2, 3)) for i in range(3))

    @jax.jit
    def both(i):
        t = i.astype(jnp.float32) / (sde.N - 1)
        score = lambda x_, t_: -eps / jnp.sqrt(1.0 - sched.alphas_cumprod[i])
        ours, ours_mean = ancestral_predictor(sde, score, x, t, z)
        ref, _ = ddpm_step(sched, eps, x, i, i - 1, z, variance_type="fixed_large",
                           prediction_type="eps", clip_x0=None)
        ref_mean, _ = ddpm_step(sched, eps, x, i, i - 1, jnp.zeros_like(z),
                                variance_type="fixed_large", prediction_type="eps", clip_x0=None)
        return ours, ours_mean, ref, ref_mean

    for i in (1, 50, 99):
        ours, ours_mean, ref, ref_mean = both(jnp.int32(i))
        np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(ours_mean, ref_mean, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_reverse_sde_and_probability_flow():
    sde, score = SDES["subvp"], gauss_score(SDES["subvp"])
    x, t = jax.random.normal(jax.random.key(0), (3, 2)), jnp.array([0.1, 0.5, 0.9])
    f, g = sde.sde(x, t)
    s = score(x, t)
    drift, diff = sde.reverse(score).sde(x, t)
    np.testing.assert_allclose(drift, f - g[:, None] ** 2 * s, rtol=1e-6)
    np.testing.assert_allclose(diff, g)
    drift, diff = sde.reverse(score, probability_flow=True).sde(x, t)
    np.testing.assert_allclose(drift, f - 0.5 * g[:, None] ** 2 * s, rtol=1e-6)
    assert np.all(np.asarray(diff) == 0)
    with pytest.raises(ValueError, match="score_fn"):
        sde.reverse(lambda x, t: x[:, :1]).sde(x, t)


# ---------------------------------------------------------------------------------------------
# Samplers


SAMPLER_CASES = [
    ("ve", dict(predictor="reverse_diffusion", corrector="langevin", snr=0.05, eps=1e-5,
                num_steps=500)),
    ("ve", dict(predictor="ancestral", corrector="none", eps=1e-5, num_steps=1000)),
    ("ve", dict(predictor="none", corrector="ald", n_corrector_steps=10, snr=0.5, eps=1e-5,
                num_steps=200)),
    ("tutorial_ve", dict(predictor="euler_maruyama", corrector="none", num_steps=1000)),
    ("vp", dict(predictor="euler_maruyama", corrector="none", num_steps=1000)),
    ("vp", dict(predictor="ancestral", corrector="langevin", num_steps=300)),
    ("subvp", dict(predictor="reverse_diffusion", corrector="ald", snr=0.1, num_steps=1000)),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, kw", SAMPLER_CASES,
                         ids=[f"{n}-{k['predictor']}-{k['corrector']}" for n, k in SAMPLER_CASES])
def test_pc_samplers_reproduce_gaussian_moments(name, kw):
    sde = SDES[name]
    x_T = exact_p_T(sde, jax.random.key(0), 20000)
    x0 = jax.jit(lambda x_T, key: pc_sample(gauss_score(sde), sde, x_T, key, **kw))(
        x_T, jax.random.key(1))
    assert_moments(x0)


@pytest.mark.parametrize("name", list(SDES))
def test_probability_flow_ode_reproduces_gaussian_moments(name):
    sde = SDES[name]
    x_T = exact_p_T(sde, jax.random.key(0), 20000)
    x0 = jax.jit(lambda x: ode_sample(gauss_score(sde), sde, x, solver="rk4", num_steps=50,
                                      eps=1e-5))(x_T)
    assert_moments(x0)


@pytest.mark.slow
def test_adaptive_ode_matches_fixed_step_and_encode_inverts_sample():
    sde = SDES["vp"]
    score = mixture_score(sde)
    x_T = sde.prior_sampling(jax.random.key(0), (64, 1))
    x_fixed = ode_sample(score, sde, x_T, solver="rk4", num_steps=200)
    x_adapt, st = jax.jit(lambda x: ode_sample(score, sde, x, solver="tsit5", rtol=1e-6,
                                               atol=1e-6))(x_T)
    np.testing.assert_allclose(x_adapt, x_fixed, atol=2e-4)
    assert 0 < int(st["num_steps"]) < 4096
    z, _ = ode_encode(score, sde, x_fixed, solver="rk4", num_steps=200)
    np.testing.assert_allclose(z, x_T, atol=2e-3)


@pytest.mark.slow
def test_pc_sample_contract():
    sde = VPSDE(N=25)
    score = gauss_score(sde)
    x_T = jax.random.normal(jax.random.key(0), (3, 2))
    key = jax.random.key(1)
    run = jax.jit(lambda x, k: pc_sample(score, sde, x, k, n_corrector_steps=2,
                                         return_trajectory=True))
    x0, xs, means = run(x_T, key)
    assert xs.shape == (26, 3, 2) and means.shape == (25, 3, 2)
    np.testing.assert_array_equal(xs[0], x_T)
    np.testing.assert_array_equal(x0, means[-1])  # denoise: the last step's mean
    # step i draws normal(fold_in(key, i), (n_corrector_steps + 1, B, ...))
    noise = jnp.stack([jax.random.normal(jax.random.fold_in(key, i), (3, 3, 2))
                       for i in range(25)])
    np.testing.assert_allclose(pc_sample(score, sde, x_T, None, n_corrector_steps=2, noise=noise),
                               x0, atol=1e-6)
    other = pc_sample(score, sde, x_T, jax.random.key(2), n_corrector_steps=2)
    assert not np.allclose(other, x0)
    # a bf16 x_T is carried in float32
    assert pc_sample(score, sde, x_T.astype(jnp.bfloat16), key).dtype == jnp.float32
    assert set(PREDICTORS) == {"euler_maruyama", "reverse_diffusion", "ancestral", "none"}
    assert set(CORRECTORS) == {"langevin", "ald", "none"}
    for kw, match in [(dict(predictor="heun"), "predictor"), (dict(corrector="x"), "corrector"),
                      (dict(snr=0.0), "snr"), (dict(n_corrector_steps=-1), "n_corrector_steps"),
                      (dict(eps=1.0), "eps"), (dict(noise=jnp.zeros((25, 3, 2))), "noise"),
                      (dict(num_steps=10), "num_steps")]:
        with pytest.raises(ValueError, match=match):
            pc_sample(score, sde, x_T, key, **kw)
    with pytest.raises(ValueError, match="key"):
        pc_sample(score, sde, x_T, None)
    with pytest.raises(ValueError, match="ancestral"):
        pc_sample(score, TutorialVESDE(N=25), x_T, key, predictor="ancestral")
    with pytest.raises(ValueError, match="model_fn"):
        pc_sample(lambda x, t: x[:, :1], sde, x_T, key)


# ---------------------------------------------------------------------------------------------
# A two-component mixture: exact score, KS against the exact CDF

W_MIX, MU_MIX, S_MIX = np.array([0.3, 0.7]), np.array([-2.0, 1.5]), np.array([0.4, 0.6])


def mixture_score(sde):
    """The exact score of the mixture under ``sde`` (``grad log p_t``)."""
    w, mu, s = map(jnp.asarray, (W_MIX, MU_MIX, S_MIX))

    def logp(x, t):  # one example: x [1], t scalar
        c, v = gauss_var(sde, t, s)
        comp = jnp.log(w) - 0.5 * jnp.log(2 * jnp.pi * v) - (x[0] - c * mu) ** 2 / (2 * v)
        return jax.nn.logsumexp(comp)

    return jax.vmap(jax.grad(logp))


def mixture_cdf(x):
    return np.sum(W_MIX * stats.norm.cdf((np.asarray(x)[:, None] - MU_MIX) / S_MIX), axis=1)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["pc", "ode"])
def test_reverse_process_recovers_a_two_mode_mixture(method):
    sde, n = VPSDE(N=500), 4000
    score = mixture_score(sde)
    x_T = sde.prior_sampling(jax.random.key(0), (n, 1))
    if method == "pc":
        x0 = jax.jit(lambda x: pc_sample(score, sde, x, jax.random.key(1)))(x_T)
    else:
        x0 = jax.jit(lambda x: ode_sample(score, sde, x, solver="rk4", num_steps=100))(x_T)
    ks = stats.kstest(np.asarray(x0).ravel(), mixture_cdf).statistic
    assert ks < 1.95 / math.sqrt(n), ks


# ---------------------------------------------------------------------------------------------
# Likelihood


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SDES))
def test_ode_likelihood_matches_the_exact_gaussian_log_density(name):
    """``log p_T(z) + delta_logp`` vs the exact ``log p_eps(x)``; a Rademacher probe is exact for
    the (linear) Gaussian drift, so any error is the solver's."""
    sde, eps = SDES[name], 1e-5
    mu, s = jnp.array([1.0, -0.5]), jnp.array([0.5, 1.5])
    x = mu + s * jax.random.normal(jax.random.key(0), (16, 2))
    ref = gauss_logp(sde, x, jnp.float32(eps), mu, s)
    run = jax.jit(lambda x: ode_likelihood(gauss_score(sde, mu, s), sde, x, jax.random.key(1),
                                           eps=eps, solver="rk4", num_steps=100))
    res = run(x)
    got = gauss_logp(sde, res.z, jnp.float32(sde.T), mu, s) + res.delta_logp
    np.testing.assert_allclose(got, ref, rtol=0, atol=5e-5)
    np.testing.assert_allclose(res.logp, sde.prior_logp(res.z) + res.delta_logp, rtol=1e-6)
    if name == "vp":  # the adaptive solver (diffrax Tsit5, rtol = atol = 1e-5), and probe="exact"
        res = ode_likelihood(gauss_score(sde, mu, s), sde, x, None, probe="exact", eps=eps)
        got = gauss_logp(sde, res.z, jnp.float32(sde.T), mu, s) + res.delta_logp
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-3)
        assert int(res.stats["num_steps"]) > 0


def _nonlinear(x):
    """A per-example nonlinear map ``[B, 2, 3] -> [B, 2, 3]`` with a dense Jacobian (and a trace
    of about 12, so that a biased probe scale shows)."""
    w = jax.random.normal(jax.random.key(42), (6, 6)) / 2
    h = x.reshape(x.shape[0], 6)
    return (jnp.tanh(h @ w + 0.3) + 0.1 * h**2 + 2.0 * h).reshape(x.shape)


@jax.jit
def _divergences(x, probes):
    """(trace by jacfwd, divergence(exact=True), jvp estimates [M, B], vjp estimates [8, B])."""
    jac = jax.vmap(jax.jacfwd(lambda u: _nonlinear(u[None])[0].ravel()))(x).reshape(2, 6, 6)
    est = jax.vmap(lambda v: divergence(_nonlinear, x, v)[1])(probes)
    est_vjp = jax.vmap(lambda v: divergence(_nonlinear, x, v, mode="vjp")[1])(probes[:8])
    return jnp.trace(jac, axis1=1, axis2=2), divergence(_nonlinear, x, None, exact=True)[1], \
        est, est_vjp


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_hutchinson_probes_are_unbiased(kind):
    x = jax.random.normal(jax.random.key(0), (2, 2, 3))
    m = 4000
    probes = hutchinson_probe(jax.random.key(1), (m, *x.shape), kind)
    if kind == "rademacher":
        assert set(np.unique(np.asarray(probes)).tolist()) == {-1.0, 1.0}
    exact, ex, est, est_vjp = _divergences(x, probes)        # est: [M, B]
    np.testing.assert_allclose(ex, exact, rtol=1e-5)
    np.testing.assert_allclose(est_vjp, est[:8], rtol=1e-5, atol=1e-5)
    exact = np.asarray(exact)
    se = np.asarray(est).std(axis=0, ddof=1) / math.sqrt(m)
    assert np.all(np.abs(np.asarray(est).mean(axis=0) - exact) <= Z * se), (
        np.asarray(est).mean(axis=0), exact, se)


def test_bits_per_dim_offset_and_likelihood_errors():
    logp = jnp.array([-100.0, 0.0])
    np.testing.assert_allclose(bits_per_dim(logp, 10), 100 / (10 * math.log(2)) * np.array([1, 0])
                               + 7.0, rtol=1e-6)
    np.testing.assert_allclose(bits_per_dim(logp, 10, data_width=1.0)[1], 8.0)
    with pytest.raises(ValueError, match="num_dims"):
        bits_per_dim(logp, 0)
    score = gauss_score(SDES["vp"])
    for kw, match in [(dict(probe="normal"), "probe"), (dict(mode="fwd"), "mode"),
                      (dict(eps=0.0), "eps"), (dict(solver="rk45"), "solver")]:
        with pytest.raises(ValueError, match=match):
            ode_likelihood(score, SDES["vp"], jnp.zeros((2, 1)), jax.random.key(0), **kw)
    with pytest.raises(ValueError, match="key"):
        ode_likelihood(score, SDES["vp"], jnp.zeros((2, 1)), None)


# ---------------------------------------------------------------------------------------------
# Losses


def _score_apply(sde):
    score = gauss_score(sde)
    return lambda params, x_t, t, cond: params * score(x_t, t)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ve", "vp"])
def test_dsm_loss_of_the_exact_score_has_its_closed_form_expectation(name):
    """At the exact score, ``E || s std + z ||^2 = c^2 s^2 / (c^2 s^2 + std^2)`` per dimension."""
    sde, n = SDES[name], 20000
    x0 = MU + S * jax.random.normal(jax.random.key(0), (n, 1))
    t = jnp.full((n,), 0.3)
    loss, aux = jax.jit(lambda p, x: dsm_loss(_score_apply(sde), p, sde, x, jax.random.key(1),
                                              t=t))(1.0, x0)
    c, v = gauss_var(sde, jnp.float32(0.3), S)
    expect = float(c**2 * S**2 / v)
    assert abs(float(loss) - expect) <= Z * math.sqrt(2) * expect / math.sqrt(n)
    # the exact score minimises the expected loss: the gradient in a scale of it vanishes
    grad = jax.grad(lambda p: dsm_loss(_score_apply(sde), p, sde, x0, jax.random.key(1), t=t)[0])
    assert abs(float(grad(1.0))) < 0.05 * abs(float(grad(0.5)))


@pytest.mark.slow
def test_likelihood_weighting_eps_loss_and_antithetic_draws():
    sde = SDES["subvp"]
    x0 = jax.random.normal(jax.random.key(0), (8, 3))
    key = jax.random.key(1)
    apply = _score_apply(sde)
    _, a = dsm_loss(apply, 0.7, sde, x0, key)
    _, b = dsm_loss(apply, 0.7, sde, x0, key, weighting="likelihood")
    np.testing.assert_array_equal(a["t"], b["t"])
    std = sde.marginal_coeffs(a["t"])[1]
    np.testing.assert_allclose(b["per_example"],
                               a["per_example"] * sde.diffusion(a["t"]) ** 2 / std**2, rtol=2e-4)
    # eps-prediction with eps = -std * score is the same objective
    eps_apply = lambda p, x_t, t, cond: -sde.marginal_coeffs(t)[1][:, None] * apply(p, x_t, t, cond)
    _, e = eps_loss(eps_apply, 0.7, sde, x0, key, reduce="sum")
    np.testing.assert_allclose(e["per_example"], a["per_example"], rtol=1e-4)
    score = score_from_eps(lambda x, t: eps_apply(0.7, x, t, None), sde)
    np.testing.assert_allclose(score(x0, a["t"]), apply(0.7, x0, a["t"], None), rtol=1e-5)
    # antithetic: u and 1 - u
    t, w = sample_t(sde, key, 9, eps=1e-3, antithetic=True)
    np.testing.assert_allclose(t[:4] + t[5:9], 1.0 + 1e-3, rtol=1e-5)
    assert np.all(np.asarray(w) == 1) and float(t.min()) >= 1e-3
    for kw, match in [(dict(importance_sampling=True), "weighting"), (dict(reduce="max"), "reduce"),
                      (dict(weighting="snr"), "weighting"), (dict(eps=0.0), "eps"),
                      (dict(weighting="likelihood", importance_sampling=True, t=0.5), "t")]:
        with pytest.raises(ValueError, match=match):
            dsm_loss(apply, 0.7, sde, x0, key, **kw)
    with pytest.raises(ValueError, match="apply_fn"):
        dsm_loss(lambda p, x, t, c: x[:, :1], 0.7, sde, x0, key)


@pytest.mark.slow
def test_importance_sampling_is_unbiased_and_reduces_variance():
    """The likelihood-weighted loss averaged over t: uniform and importance-sampled draws both
    match the quadrature of its closed form, ``int g^2 c^2 s^2 / (std^2 v) dt / (T - eps)``."""
    sde, eps, n = SDES["vp"], 1e-3, 100000
    x0 = MU + S * jax.random.normal(jax.random.key(0), (n, 1))
    run = jax.jit(lambda key, imp: dsm_loss(_score_apply(sde), 1.0, sde, x0, key,
                                            weighting="likelihood", importance_sampling=imp,
                                            eps=eps)[1]["per_example"], static_argnums=1)
    tq = np.geomspace(eps, 1.0, 20001)

    @jax.jit
    def integrand(t):
        c, v = gauss_var(sde, t, S)
        return sde.diffusion(t) ** 2 * c**2 * S**2 / (sde.marginal_coeffs(t)[1] ** 2 * v)

    integrand = np.asarray(integrand(jnp.asarray(tq, jnp.float32)), np.float64)
    expect = np.sum(0.5 * (integrand[1:] + integrand[:-1]) * np.diff(tq)) / (1.0 - eps)
    spreads = []
    for imp in (False, True):
        per = np.asarray(run(jax.random.key(1), imp), np.float64)
        se = per.std(ddof=1) / math.sqrt(n)
        assert abs(per.mean() - expect) <= Z * se, (imp, per.mean(), expect, se)
        spreads.append(per.std())
    assert spreads[1] < 0.5 * spreads[0], spreads
    t, p = importance_sample_t(sde, jnp.array([0.0, 0.5, 0.999999]), eps)
    assert float(t[0]) == pytest.approx(eps) and 0.0 < float(t[1]) < 1.0 and float(t[2]) <= 1.0
    assert bool(jnp.all(p > 0))


# ---------------------------------------------------------------------------------------------
# Score networks


def host_init(module, *args):
    """Random params of ``module`` drawn with numpy: ``init``'s shapes without compiling it."""
    shapes = jax.eval_shape(module.init, jax.random.key(0), *args)["params"]
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda a: jnp.asarray(0.3 * rng.standard_normal(a.shape), a.dtype), shapes)


@pytest.mark.slow
def test_score_mlp_freezes_its_fourier_features_and_broadcasts_t():
    sde = TutorialVESDE(sigma=25.0)
    net = ScoreMLP(sde=sde, features=(16, 16), embed_dim=8)
    x, t = jax.random.normal(jax.random.key(0), (4, 3)), jnp.array([0.01, 0.1, 0.5, 1.0])
    params = host_init(net, x, t)

    @jax.jit
    def out_and_grads(p, t):
        return net.apply({"params": p}, x, t), jax.grad(
            lambda p: jnp.sum(net.apply({"params": p}, x, t) ** 2))(p)

    out, grads = out_and_grads(params, t)
    assert out.shape == (4, 3) and out.dtype == jnp.float32
    # the Fourier frequencies get no gradient; the dense layers do
    w_grads = [v for k, v in jax.tree_util.tree_leaves_with_path(grads) if "W" == k[-1].key]
    assert len(w_grads) == 1 and float(jnp.abs(w_grads[0]).max()) == 0
    assert float(jnp.abs(grads["Dense_0"]["kernel"]).max()) > 0
    # a scalar t is broadcast over the batch
    np.testing.assert_allclose(out_and_grads(params, jnp.float32(0.5))[0],
                               out_and_grads(params, jnp.full((4,), 0.5))[0], rtol=1e-5)
    with pytest.raises(ValueError, match="t must"):
        jax.eval_shape(net.apply, {"params": params}, x, jnp.zeros((3,)))


@pytest.mark.slow
def test_score_unet_is_the_unet_over_std_with_float_timesteps():
    from jaxdiff.models import UNet, UNetConfig

    cfg = UNetConfig(in_channels=1, out_channels=1, block_channels=(8,), layers_per_block=1,
                     attention=(None,), norm_groups=4)
    sde = VPSDE()
    net = ScoreUNet(config=cfg, sde=sde)
    x = jax.random.normal(jax.random.key(0), (1, 4, 4, 1))
    x, t = jnp.concatenate([x, x]), jnp.array([0.25, 0.2501])
    params = host_init(net, x, t)
    out, raw = jax.jit(lambda p: (net.apply({"params": p}, x, t),
                                  UNet(cfg).apply({"params": p["unet"]}, x, t * 999.0)))(params)
    std = sde.marginal_coeffs(t)[1]
    np.testing.assert_allclose(out, raw / std[:, None, None, None], rtol=1e-5, atol=1e-6)
    # a fractional timestep reaches the embedding: the same image at t and t + 1e-4 differs
    assert not np.allclose(raw[0], raw[1], atol=1e-7)
    bad = UNetConfig(in_channels=1, out_channels=2, block_channels=(8,), attention=(None,),
                     norm_groups=4)
    with pytest.raises(ValueError, match="out_channels"):
        jax.eval_shape(ScoreUNet(config=bad, sde=sde).init, jax.random.key(0), x, t)
