"""The UNet forward under a ``jax.sharding.Mesh``, batch sharded over ``data``, equals the
single-device result.

Runs in a subprocess with 8 simulated CPU devices (``--xla_force_host_platform_device_count=8``):
the device count is fixed when JAX initialises, and this pytest process has one device.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from jaxdiff.models import UNet, UNetConfig, init_unet

    assert jax.device_count() == 8, jax.devices()
    cfg = UNetConfig(in_channels=1, out_channels=1, block_channels=(16, 32), layers_per_block=1,
                     attention=(None, "cross"), mid_attention="cross", num_heads=2, norm_groups=8,
                     context_dim=8, num_classes=3, class_conditioning="cross_attention")
    params = init_unet(cfg, jax.random.key(0))
    k = jax.random.split(jax.random.key(1), 2)
    B = 16
    x = jax.random.normal(k[0], (B, 8, 8, 1))
    t = jnp.arange(B, dtype=jnp.int32) * 60
    labels = jnp.arange(B, dtype=jnp.int32) % 4
    context = jax.random.normal(k[1], (B, 2, 8))

    def forward(params, x, t, labels, context):
        return UNet(cfg).apply({"params": params}, x, t, labels=labels, context=context)

    ref = jax.jit(forward)(params, x, t, labels, context)

    mesh = Mesh(np.array(jax.devices()), ("data",))
    rep, batch = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    sharded = jax.jit(
        forward,
        in_shardings=(rep, batch, batch, batch, batch),
        out_shardings=batch,
    )
    args = jax.device_put((params, x, t, labels, context), (rep, batch, batch, batch, batch))
    out = sharded(*args)
    assert out.sharding == batch, out.sharding
    assert len(out.addressable_shards) == 8
    assert all(s.data.shape == (B // 8, 8, 8, 1) for s in out.addressable_shards)
    err = float(jnp.abs(out - ref).max() / jnp.abs(ref).max())
    print("relative error", err)
    assert err <= 1e-5, err
    print("OK")
    """
)


@pytest.mark.slow
def test_batch_sharded_forward_matches_single_device():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK" in proc.stdout
