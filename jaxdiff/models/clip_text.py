"""CLIP's text transformer in Flax: transformers' ``CLIPTextModel`` and
``CLIPTextModelWithProjection``.

Token + position embeddings; ``num_hidden_layers`` pre-LayerNorm blocks (``x += attn(ln1(x))``
with causal self-attention, ``x += mlp(ln2(x))`` with ``fc1 -> act -> fc2``); a final LayerNorm.
The pooled output is the final-normed state at the EOS position (see
:class:`jaxdiff.models.CLIPTextConfig`'s ``eos_token_id``); with ``projection_dim`` set it is also
projected to ``text_embeds``.

Attention is :func:`jax.nn.dot_product_attention` with ``is_causal=True`` and, when
``attention_mask`` is given, a key-padding mask combined with the causal one (as transformers).

Param names follow transformers (``text_model/embeddings/token_embedding``,
``text_model/encoder/layers_0/self_attn/q_proj``, ``.../mlp/fc1``, ``.../layer_norm1``,
``text_model/final_layer_norm``, ``text_projection``) so weights convert by name (see
:mod:`jaxdiff.convert.transformers_clip`).

Example (random weights)::

    >>> import jax, jax.numpy as jnp
    >>> cfg = CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
    ...                      num_hidden_layers=2, num_attention_heads=4,
    ...                      max_position_embeddings=16)
    >>> params = init_clip_text(cfg, jax.random.key(0))
    >>> ids = jnp.array([[98, 5, 7, 99, 99, 99]])
    >>> out = jax.jit(CLIPTextModel(cfg).apply)({"params": params}, ids)
    >>> out.last_hidden_state.shape, out.pooler_output.shape, len(out.hidden_states)
    ((1, 6, 32), (1, 32), 3)
"""

from __future__ import annotations

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from jaxdiff.models.clip_text_config import CLIPTextConfig
from jaxdiff.validation import concrete

__all__ = [
    "CLIPTextModel",
    "CLIPTextOutput",
    "CLIPTextTransformer",
    "clip_text_param_shapes",
    "init_clip_text",
    "quick_gelu",
]


def quick_gelu(x: jax.Array) -> jax.Array:
    """``x * sigmoid(1.702 x)`` (OpenAI CLIP's GELU approximation; transformers' ``quick_gelu``)."""
    return x * jax.nn.sigmoid(jnp.asarray(1.702, x.dtype) * x)


_ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": partial(jax.nn.gelu, approximate=False)}


@struct.dataclass
class CLIPTextOutput:
    """The text encoder's outputs.

    Attributes:
      last_hidden_state: ``[B, L, D]``, after the final LayerNorm (SD's prompt embeddings).
      pooler_output: ``[B, D]``, ``last_hidden_state`` at the EOS position.
      hidden_states: ``num_hidden_layers + 1`` arrays ``[B, L, D]``: the embeddings, then each
        layer's output, *before* the final LayerNorm (transformers' ``output_hidden_states``).
        "CLIP skip" ``k`` is ``hidden_states[-(k + 1)]`` passed through
        :meth:`CLIPTextModel.final_layer_norm`.
      text_embeds: ``[B, projection_dim]`` (``pooler_output @ text_projection``), or ``None``
        without a projection head.
    """

    last_hidden_state: jax.Array
    pooler_output: jax.Array
    hidden_states: tuple[jax.Array, ...]
    text_embeds: jax.Array | None = None


def _layer_norm(config: CLIPTextConfig, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=config.layer_norm_eps, use_fast_variance=False, dtype=config.dtype,
        param_dtype=config.param_dtype, name=name,
    )  # fmt: skip


def _dense(config: CLIPTextConfig, features: int, name: str, use_bias: bool = True) -> nn.Dense:
    return nn.Dense(
        features, use_bias=use_bias, dtype=config.dtype, param_dtype=config.param_dtype, name=name
    )


class CLIPAttention(nn.Module):
    """Causal multi-head self-attention: ``q_proj``/``k_proj``/``v_proj`` (with bias),
    ``dot_product_attention`` (scale ``1 / sqrt(head_dim)``), ``out_proj``."""

    config: CLIPTextConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        """``x: [B, L, D]``, ``mask: [B, 1, 1, L]`` bool (True: attend) or None -> ``[B, L, D]``."""
        c = self.config
        split = lambda y: y.reshape(*y.shape[:2], c.num_attention_heads, c.head_dim)  # noqa: E731
        q = split(_dense(c, c.hidden_size, "q_proj")(x))
        k = split(_dense(c, c.hidden_size, "k_proj")(x))
        v = split(_dense(c, c.hidden_size, "v_proj")(x))
        out = jax.nn.dot_product_attention(
            q, k, v, mask=mask, is_causal=True, implementation=c.attention_implementation
        ).astype(q.dtype)
        return _dense(c, c.hidden_size, "out_proj")(out.reshape(*out.shape[:2], c.hidden_size))


class CLIPMLP(nn.Module):
    """``fc2(act(fc1(x)))`` with ``config.hidden_act``."""

    config: CLIPTextConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """``x: [B, L, D]`` -> ``[B, L, D]``."""
        c = self.config
        h = _ACTIVATIONS[c.hidden_act](_dense(c, c.intermediate_size, "fc1")(x))
        return _dense(c, c.hidden_size, "fc2")(h)


class CLIPEncoderLayer(nn.Module):
    """``x += self_attn(layer_norm1(x))``; ``x += mlp(layer_norm2(x))``."""

    config: CLIPTextConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        """``x: [B, L, D]`` -> ``[B, L, D]``."""
        c = self.config
        x = x + CLIPAttention(c, name="self_attn")(_layer_norm(c, "layer_norm1")(x), mask)
        return x + CLIPMLP(c, name="mlp")(_layer_norm(c, "layer_norm2")(x))


class CLIPEncoder(nn.Module):
    """The stack of :class:`CLIPEncoderLayer` s (``layers_0`` ...); returns every hidden state."""

    config: CLIPTextConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> tuple[jax.Array, ...]:
        """``x: [B, L, D]`` -> ``(x, layer_0(x), ...)``, ``num_hidden_layers + 1`` arrays."""
        states = [x]
        for i in range(self.config.num_hidden_layers):
            states.append(CLIPEncoderLayer(self.config, name=f"layers_{i}")(states[-1], mask))
        return tuple(states)


class CLIPTextEmbeddings(nn.Module):
    """``token_embedding(ids) + position_embedding(arange(L))`` (tables initialised normal(0.02),
    as transformers)."""

    config: CLIPTextConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        """``input_ids: [B, L]`` -> ``[B, L, D]``."""
        c = self.config
        kw = dict(features=c.hidden_size, dtype=c.dtype, param_dtype=c.param_dtype,
                  embedding_init=nn.initializers.normal(0.02))  # fmt: skip
        positions = jnp.arange(input_ids.shape[1])[None]
        token = nn.Embed(c.vocab_size, name="token_embedding", **kw)(input_ids)
        position = nn.Embed(c.max_position_embeddings, name="position_embedding", **kw)(positions)
        return token + position


def check_clip_inputs(config: CLIPTextConfig, input_ids, attention_mask):
    """Validate ``input_ids: [B, L]`` integers (``L <= max_position_embeddings``; concrete ids in
    ``[0, vocab_size)``) and ``attention_mask: [B, L]`` or None at trace time. Returns
    ``(input_ids, mask)``, the mask as ``[B, 1, 1, L]`` bool (nonzero: attend) or None. Raises
    ``ValueError`` naming the argument."""
    input_ids = jnp.asarray(input_ids)
    if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise ValueError(
            f"input_ids must be [B, L] integers, got shape {input_ids.shape} dtype "
            f"{input_ids.dtype}"
        )
    if input_ids.shape[1] > config.max_position_embeddings:
        raise ValueError(
            f"input_ids has length {input_ids.shape[1]} > max_position_embeddings="
            f"{config.max_position_embeddings}"
        )
    value = concrete(input_ids)
    if value is not None and value.size and (value.min() < 0 or value.max() >= config.vocab_size):
        raise ValueError(
            f"input_ids must lie in [0, vocab_size={config.vocab_size}), "
            f"got values in [{value.min()}, {value.max()}]"
        )
    if attention_mask is None:
        return input_ids, None
    attention_mask = jnp.asarray(attention_mask)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask must have input_ids' shape {input_ids.shape}, "
            f"got {attention_mask.shape}"
        )
    return input_ids, (attention_mask != 0)[:, None, None, :]


def pooled_positions(config: CLIPTextConfig, input_ids: jax.Array) -> jax.Array:
    """The pooled position of each row, ``[B]`` int: ``argmax(input_ids)`` when
    ``config.eos_token_id == 2`` (legacy rule), else the first position holding
    ``eos_token_id`` (0 when none does), as transformers."""
    if config.legacy_eos:
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax(input_ids == config.eos_token_id, axis=-1)


class CLIPTextTransformer(nn.Module):
    """transformers' CLIP text transformer (``CLIPTextModel``'s body): ``embeddings``,
    ``encoder``, ``final_layer_norm``. See :class:`CLIPTextModel` for the contract."""

    config: CLIPTextConfig

    def setup(self):
        c = self.config
        self.embeddings = CLIPTextEmbeddings(c)
        self.encoder = CLIPEncoder(c)
        self.final_layer_norm = _layer_norm(c, None)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None):
        """``(last_hidden_state, pooler_output, hidden_states)``; see :class:`CLIPTextModel`."""
        c = self.config
        input_ids, mask = check_clip_inputs(c, input_ids, attention_mask)
        x = self.embeddings(input_ids)
        states = self.encoder(x, mask)
        last = self.final_layer_norm(states[-1])
        pooled = jnp.take_along_axis(
            last, pooled_positions(c, input_ids)[:, None, None], axis=1
        )[:, 0]
        return last, pooled, states


class CLIPTextModel(nn.Module):
    """transformers' ``CLIPTextModel`` (``config.projection_dim=None``) or
    ``CLIPTextModelWithProjection`` (``projection_dim`` an int).

    ``CLIPTextModel(config).apply({"params": params}, input_ids, attention_mask=None)``.

    Args (of ``__call__``):
      input_ids: ``[B, L]`` integer ids, ``L <= max_position_embeddings`` (SD pads to 77).
        Concrete ids outside ``[0, vocab_size)`` raise; traced ones read NaN embeddings.
      attention_mask: ``[B, L]`` (nonzero: a real token, 0: padding) or None (attend to every
        earlier position). Combined with the causal mask. A position that sees no unmasked key
        (a padded position before every real token, e.g. left padding) has unspecified outputs;
        every other position is exact. SD pipelines pass no mask.

    Returns:
      :class:`CLIPTextOutput`, arrays in ``config.dtype``.

    Raises:
      ValueError: naming ``input_ids`` / ``attention_mask`` for a wrong rank, dtype, length or
        (concrete) id range.
    """

    config: CLIPTextConfig

    def setup(self):
        self.text_model = CLIPTextTransformer(self.config)
        if self.config.projection_dim is not None:
            self.text_projection = _dense(
                self.config, self.config.projection_dim, None, use_bias=False
            )

    def __call__(
        self, input_ids: jax.Array, attention_mask: jax.Array | None = None
    ) -> CLIPTextOutput:
        last, pooled, states = self.text_model(input_ids, attention_mask)
        embeds = None
        if self.config.projection_dim is not None:
            embeds = self.text_projection(pooled)
        return CLIPTextOutput(last, pooled, states, embeds)

    def final_layer_norm(self, hidden_state: jax.Array) -> jax.Array:
        """The final LayerNorm alone, ``[..., D] -> [..., D]``, for "CLIP skip":
        ``model.apply(variables, out.hidden_states[-2], method="final_layer_norm")``."""
        return self.text_model.final_layer_norm(hidden_state)


def clip_text_param_shapes(config: CLIPTextConfig) -> dict:
    """The ``jax.ShapeDtypeStruct`` tree of ``CLIPTextModel(config)``'s params (traced only)."""
    ids = jnp.zeros((1, 1), jnp.int32)
    init = lambda key: CLIPTextModel(config).init(key, ids)["params"]  # noqa: E731
    return jax.eval_shape(init, jax.random.key(0))


def init_clip_text(config: CLIPTextConfig, key: jax.Array) -> dict:
    """``CLIPTextModel(config).init(key, ...)["params"]``: embeddings normal(0.02), dense kernels
    LeCun-normal, biases 0, LayerNorm scales 1; in ``config.param_dtype``. Jitted, so one
    compilation rather than one per parameter."""
    ids = jnp.zeros((1, 1), jnp.int32)
    return jax.jit(lambda k: CLIPTextModel(config).init(k, ids)["params"])(key)
