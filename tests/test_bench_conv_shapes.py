"""benchmarks/bench_conv_shapes.py compares like with like: its im2col and per-tap forms compute
the native convolution (values and both gradients), its `pick` column follows Conv3x3's rule, and
the shapes it lists are the ones the model runs (Conv3x3's matmul-form convs included)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import bench_conv_shapes as bcs

CONVS = [
    bcs.Conv((2, 6, 6, 8), (3, 3, 8, 5), (1, 1), ((1, 1), (1, 1))),
    bcs.Conv((2, 7, 7, 8), (3, 3, 8, 5), (2, 2), ((1, 1), (1, 1))),
    bcs.Conv((2, 7, 7, 8), (3, 3, 8, 5), (2, 2), ((0, 1), (0, 1))),  # the VAE's padding=0
    bcs.Conv((2, 5, 5, 8), (1, 1, 8, 5), (1, 1), ((0, 0), (0, 0))),
]


@pytest.mark.parametrize("conv", CONVS, ids=lambda c: f"{c.kernel[0]}x{c.kernel[1]}/{c.strides[0]}"
                         f"/{c.padding[0]}")
@pytest.mark.parametrize("form", ["im2col", "taps"])
def test_forms_compute_the_native_convolution(conv, form):
    x = jax.random.normal(jax.random.key(0), conv.x)
    w = jax.random.normal(jax.random.key(1), conv.kernel)
    f = bcs.FORMS[form]
    y_ref, vjp_ref = jax.vjp(lambda a, b: bcs.native(a, b, conv), x, w)
    y, vjp = jax.vjp(lambda a, b: f(a, b, conv), x, w)
    np.testing.assert_allclose(y, y_ref, atol=1e-5, rtol=1e-5)
    g = jax.random.normal(jax.random.key(2), y.shape)
    for a, b in zip(vjp(g), vjp_ref(g)):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-5)


def test_pick_follows_conv3x3_rule():
    from jaxdiff.models.resnet import IM2COL_WIDE_MIN_CHANNELS

    pad1 = ((1, 1), (1, 1))
    wide = IM2COL_WIDE_MIN_CHANNELS
    assert bcs.picked(bcs.Conv((1, 8, 8, wide), (3, 3, wide, 4), (1, 1), pad1)) == "im2col"
    assert bcs.picked(bcs.Conv((1, 16, 16, wide), (3, 3, wide, 4), (2, 2), pad1)) == "im2col"
    assert bcs.picked(bcs.Conv((1, 17, 16, wide), (3, 3, wide, 4), (1, 1), pad1)) == "native"
    assert bcs.picked(bcs.Conv((1, 8, 8, wide - 1), (3, 3, wide - 1, 4), (1, 1), pad1)) == "native"
    assert bcs.picked(bcs.Conv((4, 2, 2, 8), (3, 3, 8, 4), (1, 1), pad1)) == "im2col"
    assert bcs.picked(bcs.Conv((4, 2, 2, 8), (3, 3, 8, 4), (2, 2), pad1)) == "native"
    assert bcs.picked(bcs.Conv((1, 8, 8, wide), (1, 1, wide, 4), (1, 1), ((0, 0), (0, 0)))) \
        == "native"


def test_conv_calls_lists_the_convs_conv3x3_runs_as_matmuls():
    """A wide conv over a small image is a matmul in the model's program, but the benchmark
    still lists it (and says it is picked as im2col)."""
    from jaxdiff.models.resnet import Conv3x3

    x = jax.ShapeDtypeStruct((1, 4, 4, 512), jnp.float32)
    m = Conv3x3(8)
    params = jax.eval_shape(lambda a: m.init(jax.random.key(0), a), x)
    prims = {e.primitive.name for e in jax.make_jaxpr(m.apply)(params, x).jaxpr.eqns}
    assert "conv_general_dilated" not in prims  # the model runs it as a matmul
    calls = bcs.conv_calls(m.apply, params, x)
    (conv, n), = calls.items()
    assert n == 1 and conv.x == (1, 4, 4, 512) and conv.kernel == (3, 3, 512, 8)
    assert bcs.picked(conv) == "im2col"


def test_model_shapes_are_collected():
    convs, what = bcs.model_convs("latent_mnist")
    assert "batch" in what and sum(convs.values()) > 10
    assert all(c.x[0] == next(iter(convs)).x[0] for c in convs)  # one batch size throughout
    with pytest.raises(ValueError, match="unknown model"):
        bcs.model_convs("nope")


@pytest.mark.parametrize("conv", CONVS, ids=lambda c: f"{c.kernel[0]}x{c.kernel[1]}/{c.strides[0]}"
                         f"/{c.padding[0]}")
def test_nchw_form_is_the_same_convolution(conv):
    x = jax.random.normal(jax.random.key(0), conv.x)
    w = jax.random.normal(jax.random.key(1), conv.kernel)
    to_nchw, to_oihw = (0, 3, 1, 2), (3, 2, 0, 1)
    y_ref, vjp_ref = jax.vjp(lambda a, b: bcs.native(a, b, conv), x, w)
    y, vjp = jax.vjp(lambda a, b: bcs.native_nchw(a, b, conv), x.transpose(to_nchw),
                     w.transpose(to_oihw))
    np.testing.assert_allclose(y, y_ref.transpose(to_nchw), atol=1e-5, rtol=1e-5)
    g = jax.random.normal(jax.random.key(2), y_ref.shape)
    dx, dw = vjp(g.transpose(to_nchw))
    dx_ref, dw_ref = vjp_ref(g)
    np.testing.assert_allclose(dx, dx_ref.transpose(to_nchw), atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(dw, dw_ref.transpose(to_oihw), atol=1e-4, rtol=1e-5)
