"""Fast parameter initialisation on the host: flax's default distributions drawn with numpy from
a tree of shapes, with nothing traced or compiled (``Module.init`` compiles one random draw per
parameter, slow for a large model on the CPU). :func:`~jaxdiff.models.init_unet` and
:func:`~jaxdiff.models.init_controlnet` use it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["host_init"]

_TRUNC = 0.87962566103423978  # std of a standard normal truncated to [-2, 2]


def _truncated_normal(rng: np.random.Generator, n: int) -> np.ndarray:
    z = rng.standard_normal(n)
    while (bad := np.abs(z) > 2).any():
        z[bad] = rng.standard_normal(int(bad.sum()))
    return z


def host_init(shapes: Any, key: jax.Array, dtype: Any, *, what: str = "host_init") -> Any:
    """Draw a params tree of the given shapes with flax's default initialisers, on the host.

    Conv and dense kernels LeCun-normal (a normal truncated to 2 std with variance
    ``1 / fan_in``), biases 0, norm scales 1, embedding tables standard normal; drawn with numpy
    from a generator seeded by ``key``'s data: deterministic in ``key``, different from
    ``Module.init``'s values for the same key.

    Args:
      shapes: a tree of arrays or ``jax.ShapeDtypeStruct`` (``*_param_shapes``), leaves named
        ``kernel`` / ``bias`` / ``scale`` / ``embedding``.
      key: a concrete PRNG key (typed or raw ``uint32``).
      dtype: the parameters' dtype.
      what: the caller's name, for the error.

    Returns:
      The same tree with ``jax.Array`` leaves.

    Raises:
      ValueError: ``key`` is a tracer (inside ``jit`` / ``vmap``: use ``Module.init`` there).
    """
    if isinstance(key, jax.core.Tracer):
        raise ValueError(f"{what} needs a concrete key; under jit/vmap use the module's init")
    data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    rng = np.random.default_rng(np.asarray(data, np.uint32).ravel().tolist())
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    leaves = []
    for path, spec in flat:
        name, shape = path[-1].key, tuple(spec.shape)
        n = int(np.prod(shape))
        if name == "kernel":
            fan_in = int(np.prod(shape[:-1]))
            value = _truncated_normal(rng, n) * (np.sqrt(1.0 / fan_in) / _TRUNC)
        elif name == "embedding":
            value = rng.standard_normal(n)
        elif name == "scale":
            value = np.ones(n)
        elif name == "bias":
            value = np.zeros(n)
        else:  # pragma: no cover - a new parameter kind must be added here
            raise NotImplementedError(f"no initializer for parameter {jax.tree_util.keystr(path)}")
        leaves.append(jnp.asarray(value.reshape(shape), dtype))
    return jax.tree_util.tree_unflatten(treedef, leaves)
