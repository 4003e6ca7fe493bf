"""Smoke test of ``python -m experiments.score_1d`` (a few training steps, small sample sets): the
PNGs and the summary are written and sane; flag errors become one-line ConfigErrors.

The exact-score PC samples are a real check even at this size: their KS statistic against the
mixture must fall below the 0.1% critical value ``1.95 / sqrt(n)``.
"""

import math
import os

import numpy as np
import pytest

from experiments import score_1d
from experiments.cli import ConfigError

pytest.importorskip("matplotlib", reason="the plots need matplotlib (jaxdiff[plots])")


@pytest.mark.slow
def test_score_1d_writes_pngs_and_summary(tmp_path):
    from PIL import Image

    out = score_1d.main(["--train_steps=20", "--batch_size=64", "--num_samples=400",
                         "--sample_steps=40", "--grid_points=16", "--ode_solver=rk4",
                         f"--out_dir={tmp_path}"])
    for name in ("forward", "samples", "density"):
        path = out["files"][name]
        assert path == os.path.join(str(tmp_path), f"score_1d_{name}.png")
        with Image.open(path) as img:
            assert img.format == "PNG" and img.width >= 400 and img.height >= 200
            assert np.asarray(img.convert("L")).std() > 5  # not blank
    text = open(out["files"]["summary"]).read()
    assert "Kolmogorov-Smirnov" in text and "held-out NLL" in text
    assert set(out["ks"]) == {"exact score, PC", "learned, Euler-Maruyama", "learned, PC",
                              "learned, ODE (rk4)"}
    assert all(0.0 < v < 1.0 for v in out["ks"].values())
    assert out["ks"]["exact score, PC"] < 1.95 / math.sqrt(400), out["ks"]
    assert abs(out["true_below0"] - 0.3) < 0.01
    assert np.all(np.isfinite(out["learned_logp"])) and out["learned_logp"].shape == (16,)
    assert math.isfinite(out["nll_learned"]) and 1.0 < out["nll_true"] < 2.0
    assert out["ode_steps"] == 8 and len(out["losses"]) == 1


def test_score_1d_helpers_and_flag_errors(tmp_path):
    x = np.linspace(-6, 6, 2001)
    pdf = np.exp(score_1d.mixture_logpdf(x))
    assert abs(np.sum(pdf) * (x[1] - x[0]) - 1.0) < 1e-3
    np.testing.assert_allclose(score_1d.mixture_cdf(np.array([-50.0, 50.0])), [0.0, 1.0])
    # the marginal score at t -> 0 is the data score d/dx log p
    sde = score_1d.make_sde("vp", 100)
    import jax
    import jax.numpy as jnp

    xs = jnp.array([[-2.5], [0.0], [1.0]])
    got = np.asarray(jax.jit(score_1d.marginal_score(sde))(xs, jnp.zeros((3,))))[:, 0]
    h = 1e-3
    ref = (score_1d.mixture_logpdf(np.asarray(xs)[:, 0] + h)
           - score_1d.mixture_logpdf(np.asarray(xs)[:, 0] - h)) / (2 * h)
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-3)
    for flag, match in [("--train_steps=0", "train_steps"), ("--sde=edm", "sde"),
                        ("--learning_rate=0", "learning_rate")]:
        with pytest.raises(ConfigError, match=match):
            score_1d.main([flag, f"--out_dir={tmp_path}"])
