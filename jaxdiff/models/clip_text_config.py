"""``CLIPTextConfig``: the CLIP text encoder's hyper-parameters as a small frozen dataclass.

The fields are those of transformers' ``CLIPTextConfig`` that change the forward pass, plus
jaxdiff's compute options. Every field is validated when the config is built (a ``ValueError``
naming the field). :func:`jaxdiff.convert.clip_text_config_from_transformers` maps a transformers
config (``text_encoder/config.json``) onto it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from jaxdiff.validation import check_choice, check_float, check_int

__all__ = ["CLIPTextConfig", "CLIP_ACTIVATIONS", "CLIP_ATTENTION_IMPLEMENTATIONS"]

CLIP_ACTIVATIONS = ("quick_gelu", "gelu")
CLIP_ATTENTION_IMPLEMENTATIONS = (None, "xla", "cudnn")
LEGACY_EOS_TOKEN_ID = 2  # transformers: eos_token_id == 2 selects the argmax(input_ids) rule


def _float_dtype(name: str, value) -> jnp.dtype:
    try:
        dtype = None if value is None else jnp.dtype(value)
    except TypeError:
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"{name} must be a floating dtype (float32, bfloat16, float16, ...), got {value!r}"
        )
    return dtype


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The CLIP text transformer's hyper-parameters (see :class:`jaxdiff.models.CLIPTextModel`).

    Defaults are transformers' ``CLIPTextConfig`` defaults (openai/clip-vit-base-patch32's text
    tower). Stable Diffusion 1.x: ``hidden_size=768, intermediate_size=3072,
    num_attention_heads=12, eos_token_id=2``; SD 2.x: ``hidden_size=1024, intermediate_size=4096,
    num_hidden_layers=23, num_attention_heads=16, hidden_act="gelu"``.

    Attributes:
      vocab_size: rows of the token embedding; ids must lie in ``[0, vocab_size)``.
      hidden_size: the width ``D`` of every hidden state.
      intermediate_size: the MLP's inner width.
      num_hidden_layers: encoder layers.
      num_attention_heads: heads; must divide ``hidden_size``.
      max_position_embeddings: rows of the position embedding, the longest sequence ``L``.
      hidden_act: the MLP activation, ``"quick_gelu"`` (``x * sigmoid(1.702 x)``, SD 1.x) or
        ``"gelu"`` (exact erf GELU, SD 2.x / SDXL).
      layer_norm_eps: epsilon of every LayerNorm.
      eos_token_id: selects the pooled position: ``2`` is transformers' legacy rule, the position
        of the largest id (``argmax(input_ids)``, where CLIP's EOS is the largest id); any other
        value pools at the first position holding ``eos_token_id`` (position 0 if none does).
      projection_dim: ``None`` for transformers' ``CLIPTextModel``; an int adds the bias-free
        ``text_projection`` of ``CLIPTextModelWithProjection`` (SDXL's second encoder), whose
        output is ``text_embeds: [B, projection_dim]``.
      dtype: computation dtype (``bfloat16`` works; LayerNorm statistics and attention softmax
        stay float32); param_dtype: parameter dtype.
      attention_implementation: ``jax.nn.dot_product_attention``'s ``implementation``: ``None``
        or ``"xla"`` (the XLA path, every backend), or ``"cudnn"`` (cuDNN fused attention: GPU
        only, ``dtype`` bfloat16 / float16; raises at trace time otherwise).

    Raises:
      ValueError: naming the field, for a field of the wrong type or out of range (counts and
        widths ints >= 1, ``eos_token_id`` an int >= 0, ``layer_norm_eps`` > 0, the string
        fields one of their choices, dtypes floating), or heads that do not split
        ``hidden_size``.
    """

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407
    projection_dim: int | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_implementation: str | None = None

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "max_position_embeddings"):  # fmt: skip
            object.__setattr__(self, name, check_int(name, getattr(self, name), minimum=1))
        object.__setattr__(self, "eos_token_id",
                           check_int("eos_token_id", self.eos_token_id, minimum=0))  # fmt: skip
        if self.projection_dim is not None:
            object.__setattr__(
                self, "projection_dim", check_int("projection_dim", self.projection_dim, minimum=1)
            )
        object.__setattr__(
            self, "layer_norm_eps",
            check_float("layer_norm_eps", self.layer_norm_eps, minimum=0.0,
                        exclusive_minimum=True),
        )  # fmt: skip
        check_choice("hidden_act", self.hidden_act, CLIP_ACTIVATIONS)
        check_choice("attention_implementation", self.attention_implementation,
                     CLIP_ATTENTION_IMPLEMENTATIONS)  # fmt: skip
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must divide "
                f"hidden_size={self.hidden_size}"
            )
        object.__setattr__(self, "dtype", _float_dtype("dtype", self.dtype))
        object.__setattr__(self, "param_dtype", _float_dtype("param_dtype", self.param_dtype))

    @property
    def legacy_eos(self) -> bool:
        """Whether the pooled output uses the legacy ``argmax(input_ids)`` rule."""
        return self.eos_token_id == LEGACY_EOS_TOKEN_ID

    @property
    def head_dim(self) -> int:
        """Channels per attention head."""
        return self.hidden_size // self.num_attention_heads
