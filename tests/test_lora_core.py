"""jaxdiff.lora.core: the adapter as a tree transform (targets, init, merge, checks)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.lora import (TEXT_ATTENTION, UNET_ATTENTION, UNET_FEED_FORWARD, check_lora,
                          init_lora, lora_layers, lora_param_count, lora_rank, lora_scale,
                          merge_lora, merge_loras)
from jaxdiff.models import UNet, init_unet
from jaxdiff.models.unet import unet_dummy_inputs
from jaxdiff.models.unet_config import UNetConfig


def _unet():
    cfg = UNetConfig(in_channels=4, out_channels=4, block_channels=(16, 32),
                     attention=(None, "cross"), mid_attention="cross", layers_per_block=1,
                     num_heads=2, norm_groups=8, context_dim=12)
    return cfg, init_unet(cfg, jax.random.key(0))


def test_targets_choose_attention_and_feed_forward_layers():
    _, params = _unet()
    attn = lora_layers(params, UNET_ATTENTION)
    names = sorted({p[-2] + "/" + p[-1] for p in attn})
    assert names == sorted(f"{a}/{p}" for a in ("attn1", "attn2")
                           for p in ("to_k", "to_out_0", "to_q", "to_v"))
    ff = lora_layers(params, UNET_FEED_FORWARD)
    assert {p[-1] for p in ff} == {"proj", "net_2"} and not set(ff) & set(attn)
    with pytest.raises(ValueError, match="match no layer"):
        lora_layers(params, TEXT_ATTENTION)
    with pytest.raises(ValueError, match="regular expression"):
        lora_layers(params, "(")


@pytest.mark.slow   # two UNet applies, ~20 s on 2 cores
def test_fresh_adapter_is_identity_and_delta_is_low_rank():
    cfg, params = _unet()
    lora = init_lora(params, UNET_ATTENTION, rank=2, key=jax.random.key(1))
    assert lora_rank(lora) == 2
    assert lora_param_count(lora) == sum(2 * (s[0] + s[1]) for s in
                                         lora_layers(params, UNET_ATTENTION).values())
    (x, t), kw = unet_dummy_inputs(cfg, batch=2)
    x = jax.random.normal(jax.random.key(5), x.shape)
    kw = {"context": jax.random.normal(jax.random.key(6), (2, 3, 12))}
    base = UNet(cfg).apply({"params": params}, x, t, **kw)
    same = UNet(cfg).apply({"params": merge_lora(params, lora, 3.0)}, x, t, **kw)
    np.testing.assert_array_equal(np.asarray(base), np.asarray(same))
    # a non-zero up: the kernel moves by exactly scale * down @ up, everything else stays
    lora = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(7), a.shape), lora)
    merged = merge_lora(params, lora, 0.5)
    blk = ("down_blocks_1", "attentions_0", "transformer_blocks_0", "attn2", "to_k")
    get = lambda tree: tree[blk[0]][blk[1]][blk[2]][blk[3]][blk[4]]  # noqa: E731
    want = get(params)["kernel"] + 0.5 * get(lora)["down"] @ get(lora)["up"]
    np.testing.assert_allclose(get(merged)["kernel"], want, rtol=1e-6, atol=1e-6)
    assert np.linalg.matrix_rank(np.asarray(get(merged)["kernel"] - get(params)["kernel"]),
                                 tol=1e-5) == 2
    np.testing.assert_array_equal(merged["conv_in"]["kernel"], params["conv_in"]["kernel"])


def test_traced_scale_does_not_recompile_and_adapters_add():
    _, params = _unet()
    a = jax.tree.map(lambda x: x + 0.05, init_lora(params, UNET_ATTENTION, rank=1,
                                                  key=jax.random.key(2)))
    b = jax.tree.map(lambda x: x - 0.02, init_lora(params, UNET_ATTENTION, rank=3,
                                                  key=jax.random.key(3)))
    traces = []

    @jax.jit
    def merged(params, a, b, sa, sb):
        traces.append(1)
        return merge_loras(params, [(a, sa), (b, sb)])

    one = merged(params, a, b, jnp.float32(0.3), jnp.float32(-1.0))
    two = merged(params, a, b, jnp.float32(0.7), jnp.float32(2.0))
    assert len(traces) == 1
    seq = merge_lora(merge_lora(params, a, 0.7), b, 2.0)
    for x, y in zip(jax.tree.leaves(two), jax.tree.leaves(seq)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    assert not all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(one),
                                                         jax.tree.leaves(two)))


def test_conv_kernel_and_bad_adapters():
    params = {"proj_in": {"kernel": jnp.ones((3, 3, 4, 5))}, "lin": {"kernel": jnp.ones((2, 3))}}
    lora = init_lora(params, "proj_in$", rank=2, key=jax.random.key(0))
    assert lora["proj_in"]["down"].shape == (3, 3, 4, 2) and lora["proj_in"]["up"].shape == (2, 5)
    with pytest.raises(ValueError, match=r"rank 3 is larger than layer lin \(kernel \(2, 3\)"):
        init_lora(params, "lin$", rank=3, key=jax.random.key(0))
    with pytest.raises(ValueError, match="positive integer"):
        init_lora(params, "lin$", rank=0, key=jax.random.key(0))
    wrong = {"lin": {"down": jnp.ones((4, 1)), "up": jnp.ones((1, 3))},
             "nope": {"down": jnp.ones((2, 1)), "up": jnp.ones((1, 3))}}
    with pytest.raises(ValueError, match=r"2 layer\(s\).*lin: down \(4, 1\) @ up \(1, 3\).*"
                                         r"nope: no such layer"):
        check_lora(params, wrong)
    with pytest.raises(ValueError, match="needs both"):
        check_lora(params, {"lin": {"down": jnp.ones((2, 1))}})
    assert lora_scale(4, 8) == 2.0 and lora_scale(4, None) == 1.0
