"""Tests of jaxdiff.metrics: FID against scipy, classifier statistics, the classifier itself, and
the variational bound (bits/dim) against closed forms."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import scipy.stats
from hypothesis import given
from hypothesis import strategies as st
from scipy import integrate
from scipy.special import log_ndtr

from jaxdiff.metrics import likelihood
from jaxdiff.metrics.fid import (class_histogram, conditional_accuracy, feature_statistics,
                                 fid_from_features, frechet_distance)
from jaxdiff.metrics.likelihood import (discretized_gaussian_log_likelihood, normal_kl, prior_bpd,
                                        vlb_terms)
from jaxdiff.schedules import make_schedule

LOG2 = math.log(2.0)
GRID = np.linspace(-1.0, 1.0, 256)          # the 256 values of 8-bit data scaled to [-1, 1]


# --------------------------------------------------------------------------------------------- FID


def _random_cov(rng, d, rank=None, jitter=0.0):
    a = rng.normal(size=(d, rank or d))
    return a @ a.T / (rank or d) + jitter * np.eye(d)


def _scipy_fid(mu1, s1, mu2, s2):
    """The reference: pytorch-fid's formula on scipy.linalg.sqrtm, with its offset fix."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * 1e-6
        covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    covmean = np.real(covmean)
    diff = mu1 - mu2
    return diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)


@pytest.mark.parametrize("d, rank", [(16, None), (32, 8)])
def test_fid_of_identical_statistics_is_zero(d, rank):
    rng = np.random.default_rng(0)
    mu, s = rng.normal(size=d), _random_cov(rng, d, rank)
    assert frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-6)
    feats = rng.normal(size=(500, d))
    assert fid_from_features(feats, feats) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("d, rank, jitter", [(8, None, 0.0), (64, None, 0.0), (24, 6, 1e-9)])
def test_fid_matches_scipy_sqrtm(seed, d, rank, jitter):
    rng = np.random.default_rng(seed)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = _random_cov(rng, d, rank, jitter), _random_cov(rng, d, rank, jitter)
    ours, ref = frechet_distance(mu1, s1, mu2, s2), _scipy_fid(mu1, s1, mu2, s2)
    # Near-singular covariances: sqrtm of a rank-deficient product is only accurate to ~1e-5.
    assert ours == pytest.approx(ref, rel=1e-7 if rank is None else 1e-4, abs=1e-6)


def test_fid_closed_forms():
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2 with standard deviations s.
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0)
    # Commuting (diagonal) covariances: sum (sqrt(a) - sqrt(b))^2.
    a, b = np.array([1.0, 4.0, 0.0, 2.5]), np.array([9.0, 1.0, 0.0, 2.5])
    expected = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    ours = frechet_distance(np.zeros(4), np.diag(a), np.zeros(4), np.diag(b))
    assert ours == pytest.approx(expected)


@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(0.1, 10.0))
def test_fid_symmetry_and_invariances(seed, scale):
    rng = np.random.default_rng(seed)
    d = 6
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = _random_cov(rng, d), _random_cov(rng, d, rank=3)
    base = frechet_distance(mu1, s1, mu2, s2)
    assert base >= 0
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(base, rel=1e-6, abs=1e-9)
    shift = rng.normal(size=d)                                  # same translation of both
    shifted = frechet_distance(mu1 + shift, s1, mu2 + shift, s2)
    assert shifted == pytest.approx(base, rel=1e-6, abs=1e-9)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))                # same rotation of both
    rotated = frechet_distance(q @ mu1, q @ s1 @ q.T, q @ mu2, q @ s2 @ q.T)
    assert rotated == pytest.approx(base, rel=1e-6, abs=1e-9)
    scaled = frechet_distance(scale * mu1, scale**2 * s1, scale * mu2, scale**2 * s2)
    assert scaled == pytest.approx(scale**2 * base, rel=1e-6, abs=1e-9)


def test_feature_statistics_and_errors():
    rng = np.random.default_rng(1)
    f = rng.normal(size=(100, 5)).astype(np.float32)
    mu, sigma = feature_statistics(jnp.asarray(f))
    np.testing.assert_allclose(mu, f.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(f.astype(np.float64), rowvar=False), rtol=1e-10)
    with pytest.raises(ValueError, match="shape"):
        frechet_distance(mu, sigma, mu[:4], sigma[:4, :4])
    with pytest.raises(ValueError, match="sigma1"):
        frechet_distance(mu, sigma[:4], mu, sigma)
    with pytest.raises(ValueError, match="N >= 2"):
        feature_statistics(f[:1])


def test_conditional_accuracy_and_histogram():
    logits = jnp.array([[5.0, 0, 0], [0, 5, 0], [0, 0, 5], [0, 5, 0], [1, 0, 0]])
    requested = jnp.array([0, 1, 1, 1, 2])
    assert float(jax.jit(conditional_accuracy)(logits, requested)) == pytest.approx(3 / 5)
    np.testing.assert_array_equal(jax.jit(class_histogram)(logits), [2, 2, 1])
    np.testing.assert_allclose(class_histogram(logits, normalize=True), [0.4, 0.4, 0.2])
    with pytest.raises(ValueError, match="requested_labels"):
        conditional_accuracy(logits, requested[:3])


# ------------------------------------------------------------------------------------- likelihood


@pytest.mark.parametrize("m1, v1, m2, v2",
                         [(0.0, 1.0, 0.0, 1.0), (0.3, 0.5, -1.0, 2.0), (2.0, 0.01, 1.9, 0.04)])
def test_normal_kl_vs_numerical_integration(m1, v1, m2, v2):
    p, q = scipy.stats.norm(m1, math.sqrt(v1)), scipy.stats.norm(m2, math.sqrt(v2))
    lo, hi = m1 - 12 * math.sqrt(v1), m1 + 12 * math.sqrt(v1)
    ref, _ = integrate.quad(lambda x: p.pdf(x) * (p.logpdf(x) - q.logpdf(x)), lo, hi, limit=200)
    f32 = jnp.float32
    ours = normal_kl(f32(m1), jnp.log(f32(v1)), f32(m2), jnp.log(f32(v2)))
    assert float(ours) == pytest.approx(ref, rel=1e-5, abs=1e-6)


def _ref_discretized(x, mean, scale):
    """float64 scipy reference: log of the Gaussian mass of each 8-bit bin (edge bins open)."""
    lo = np.where(x < -0.999, -np.inf, (x - 1 / 255 - mean) / scale)
    hi = np.where(x > 0.999, np.inf, (x + 1 / 255 - mean) / scale)
    flip = (lo + hi) > 0                                  # stay in the left tail for precision
    a, b = np.where(flip, -hi, lo), np.where(flip, -lo, hi)
    la, lb = log_ndtr(a), log_ndtr(b)
    return lb + np.log(-np.expm1(la - lb))


@pytest.mark.parametrize("mean, scale", [(0.0, 0.3), (0.9, 0.01), (-0.5, 0.002), (0.2, 20.0)])
def test_discretized_gaussian_log_likelihood_vs_scipy(mean, scale):
    x = jnp.asarray(GRID, jnp.float32)
    ref = _ref_discretized(GRID, mean, scale)
    fn = jax.jit(discretized_gaussian_log_likelihood, static_argnames="approx_cdf")
    exact = np.asarray(fn(x, mean, math.log(scale), approx_cdf=False), np.float64)
    big = ref > -30                                      # float32 has no say beyond that
    np.testing.assert_allclose(exact[big], ref[big], rtol=2e-4, atol=2e-5)
    assert np.all(exact[~big] < -25)
    # The 256 masses sum to one (the bins tile the line), for both CDFs.
    assert float(np.exp(exact).sum()) == pytest.approx(1.0, abs=1e-4)
    approx = np.asarray(fn(x, mean, math.log(scale), approx_cdf=True), np.float64)
    assert float(np.exp(approx).sum()) == pytest.approx(1.0, abs=1e-4)
    # The tanh CDF is accurate to ~2e-4 in probability: compare where the mass is not tiny.
    mass = np.exp(ref) > 1e-2
    np.testing.assert_allclose(np.exp(approx[mass]), np.exp(ref[mass]), rtol=2e-2, atol=3e-4)


def _point_oracle(sched, c, prediction_type):
    """A model that knows the data is the single point ``c``: exact eps or x0."""
    def model_fn(x_t, t):
        if prediction_type == "x0":
            return jnp.broadcast_to(c, x_t.shape)
        a = sched.sqrt_alphas_cumprod[t][:, None, None, None]
        s = sched.sqrt_one_minus_alphas_cumprod[t][:, None, None, None]
        return (x_t - a * c) / s
    return model_fn


def _expected_point_bpd(betas, c, variance_type):
    """Closed-form terms (bits/dim) of the bound for data = the point ``c`` under the oracle."""
    acp = np.cumprod(1 - betas)
    acp_prev = np.concatenate([[1.0], acp[:-1]])
    pv = betas * (1 - acp_prev) / (1 - acp)
    if variance_type == "fixed_small":
        kl = np.zeros(len(betas) - 1)                     # same mean, same variance
    else:                                                 # KL(N(m, pv) || N(m, beta))
        kl = 0.5 * (-1 + np.log(betas[1:]) - np.log(pv[1:]) + pv[1:] / betas[1:])
    # Decoder at k = 0: mean exactly c, std sqrt(pv[1]) for both fixed types.
    nll = -_ref_discretized(c, c, math.sqrt(pv[1])).mean()
    prior = (0.5 * (-np.log(1 - acp[-1]) - acp[-1] + acp[-1] * c**2)).mean()
    return prior / LOG2, np.concatenate([[nll], kl]) / LOG2


@pytest.mark.slow
@pytest.mark.parametrize("prediction_type, variance_type", [("eps", "fixed_small"),
                                                             ("x0", "fixed_large")])
def test_vlb_of_a_point_mass_under_the_oracle_matches_closed_form(prediction_type, variance_type):
    sched = make_schedule("linear", 1000)
    rng = np.random.default_rng(0)
    c_np = rng.choice(GRID, size=(1, 4, 4, 1))
    c_np[0, 0, :2, 0] = [-1.0, 1.0]                        # both edge bins
    c = jnp.asarray(c_np, jnp.float32)
    x0 = jnp.broadcast_to(c, (2, 4, 4, 1))
    run = jax.jit(lambda x, k: vlb_terms(_point_oracle(sched, c, prediction_type), sched, x, k,
                                         prediction_type=prediction_type,
                                         variance_type=variance_type, approx_cdf=False,
                                         t_batch_size=50))
    out = run(x0, jax.random.key(0))
    prior, terms = _expected_point_bpd(np.linspace(1e-4, 0.02, 1000), c_np, variance_type)
    assert out.terms.shape == (2, 1000) and out.total.shape == (2,)
    np.testing.assert_allclose(out.prior, prior, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(out.terms[:, 0], terms[0], rtol=1e-4)   # the decoder, ~1 bit
    np.testing.assert_allclose(out.terms[:, 1:], np.broadcast_to(terms[1:], (2, 999)), atol=2e-5)
    np.testing.assert_allclose(out.total, prior + terms.sum(), rtol=1e-3)
    if variance_type == "fixed_small":
        # Only the decoder and the (tiny) prior remain: ~1 bit/dim for these 16 pixels.
        assert 0.5 < float(out.total[0]) < 1.5


def test_vlb_prior_matches_closed_form():
    sched = make_schedule("cosine", 100)
    x0 = jnp.asarray(np.random.default_rng(2).choice(GRID, size=(3, 2, 2, 1)), jnp.float32)
    abar = float(sched.alphas_cumprod[-1])
    expected = (0.5 * (-np.log1p(-abar) - abar + abar * np.asarray(x0) ** 2)).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(jax.jit(prior_bpd)(sched, x0), expected / LOG2, rtol=1e-5)


def test_worse_models_give_a_larger_bound():
    sched = make_schedule("linear", 200, beta_end=0.1)
    c = jnp.asarray(np.random.default_rng(3).choice(GRID, size=(1, 4, 4, 1)), jnp.float32)
    x0 = jnp.broadcast_to(c, (2, 4, 4, 1))

    @jax.jit
    def bound(offset, zero):       # an oracle of the point c + offset; or a model that says eps = 0
        oracle = _point_oracle(sched, c + offset, "eps")
        fn = lambda x, t: jnp.where(zero, 0.0, oracle(x, t))  # noqa: E731
        return likelihood.bits_per_dim(fn, sched, x0, jax.random.key(1),
                                       variance_type="fixed_small")

    oracle, near, far = (bound(d, False) for d in (0.0, 0.05, 0.3))
    zero = bound(0.0, True)
    assert np.all(oracle < near) and np.all(near < far) and np.all(oracle < zero)


@pytest.mark.slow
def test_vlb_learned_variance_types_and_t_batching_agree():
    sched = make_schedule("linear", 64, beta_end=0.05)
    c = jnp.asarray(np.random.default_rng(4).choice(GRID, size=(1, 3, 3, 1)), jnp.float32)
    x0 = jnp.broadcast_to(c, (2, 3, 3, 1)) * 0.9
    eps_fn = _point_oracle(sched, c, "eps")                 # slightly wrong: data is 0.9 c
    key = jax.random.key(5)

    @jax.jit
    def learned_range(v):        # v = -1: the posterior variance; v = +1: beta (first: pv[1])
        def fn(x, t):
            return jnp.concatenate([eps_fn(x, t), jnp.full_like(x, v)], axis=-1)
        return likelihood.bits_per_dim(fn, sched, x0, key, variance_type="learned_range",
                                       t_batch_size=16)

    fixed = jax.jit(lambda vt: likelihood.bits_per_dim(eps_fn, sched, x0, key, variance_type=vt),
                    static_argnums=0)
    np.testing.assert_allclose(learned_range(-1.0), fixed("fixed_small"), rtol=1e-5)
    np.testing.assert_allclose(learned_range(1.0), fixed("fixed_large"), rtol=1e-5)
    with pytest.raises(ValueError, match="2C|shape"):
        likelihood.bits_per_dim(eps_fn, sched, x0, key, variance_type="learned")
    with pytest.raises(ValueError, match="variance_type"):
        likelihood.bits_per_dim(eps_fn, sched, x0, key, variance_type="fixed")


# ------------------------------------------------------------------------------------- classifier


def glyph_digits(n, seed):
    """``[n, 28, 28, 1]`` float32 in ``[-1, 1]`` and ``[n]`` int32: the digits 0-9 printed in
    Pillow's default font at random sizes, offsets and rotations. A learnable stand-in for MNIST
    where the real files are absent (tests never download)."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    fonts = {s: ImageFont.load_default(size=s) for s in range(16, 25)}
    labels = rng.integers(0, 10, n).astype(np.int32)
    out = np.empty((n, 28, 28, 1), np.float32)
    for i, d in enumerate(labels):
        img = Image.new("L", (28, 28))
        dx, dy = rng.integers(-3, 4, 2)
        ImageDraw.Draw(img).text((14 + dx, 14 + dy), str(d), fill=255,
                                 font=fonts[int(rng.integers(16, 25))], anchor="mm")
        img = img.rotate(float(rng.uniform(-15, 15)), resample=Image.BILINEAR)
        out[i, ..., 0] = np.asarray(img, np.float32) / 127.5 - 1
    return out, labels


@pytest.fixture(scope="module")
def mnist_small():
    """2000 training and 1000 test images: MNIST from a local IDX copy (never the network),
    else printed digits (``glyph_digits``), on which the same test must pass."""
    from jaxdiff import data

    try:
        (xtr, ytr), (xte, yte) = (data.load_mnist("train", source="local"),
                                  data.load_mnist("test", source="local"))
    except FileNotFoundError:
        x, y = glyph_digits(3000, seed=0)
        return (x[:2000], y[:2000]), (x[2000:], y[2000:])
    return (xtr[:2000], ytr[:2000]), (xte[:1000], yte[:1000])


@pytest.mark.slow
def test_classifier_learns_on_a_small_subset(mnist_small, tmp_path):
    from jaxdiff.metrics import classifier as C

    (xtr, ytr), (xte, yte) = mnist_small
    params = C.train_classifier(xtr, ytr, key=jax.random.key(0), epochs=1, batch_size=16,
                                learning_rate=2e-3)
    acc = C.classifier_accuracy(params, xte, yte, batch_size=500)
    assert acc >= 0.85, acc    # chance is 0.1; observed 0.924 on MNIST, 0.91 on glyph_digits
    feats = jax.jit(C.classifier_features)(params, xte[:7])
    logits = jax.jit(C.classifier_logits)(params, xte[:7])
    assert feats.shape == (7, 128) and logits.shape == (7, 10)
    f2, l2 = C.classify(params, xte[:7], batch_size=4)   # padded last batch
    np.testing.assert_allclose(f2, feats, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(l2, logits, rtol=1e-5, atol=1e-5)

    path = str(tmp_path / "clf.msgpack")
    C.save_classifier(path, params, {"test_accuracy": acc})
    loaded, meta = C.load_classifier(path, with_metadata=True)
    assert meta["test_accuracy"] == pytest.approx(acc)
    np.testing.assert_array_equal(C.classify(loaded, xte[:7], batch_size=7)[1],
                                  C.classify(params, xte[:7], batch_size=7)[1])
    with open(path, "wb") as f:
        f.write(b"\x80")                          # an empty msgpack map: not a classifier file
    with pytest.raises(ValueError, match="not a classifier"):
        C.load_classifier(path)
    with pytest.raises(ValueError, match="28, 28, 1"):
        C.classifier_logits(params, xte[:2, :14])


@pytest.mark.slow
@pytest.mark.parametrize("corrupt", ["extra_data", "truncated", "empty", "other_shapes"])
def test_corrupt_classifier_file_is_one_error_naming_it(tmp_path, corrupt):
    """A corrupt classifier msgpack (msgpack's ``ExtraData``, a truncated or empty file) or one
    of another architecture is an InvalidFileError naming the file and what to do."""
    from jaxdiff.metrics import classifier as C
    from jaxdiff.validation import InvalidFileError

    path = str(tmp_path / "clf.msgpack")
    params = C.init_classifier(jax.random.key(0))
    C.save_classifier(path, params)
    raw = open(path, "rb").read()
    if corrupt == "other_shapes":
        params = jax.tree.map(lambda p: np.zeros(p.shape[:-1] + (p.shape[-1] + 1,), p.dtype),
                              params)
        C.save_classifier(path, params)
    else:
        data = {"extra_data": raw + b"garbage", "truncated": raw[: len(raw) // 2],
                "empty": b""}[corrupt]
        open(path, "wb").write(data)
    with pytest.raises(InvalidFileError) as e:
        C.load_classifier(path)
    msg = str(e.value)
    assert msg.startswith(path) and "delete it to train a new classifier" in msg, msg
    assert e.value.__cause__ is None
