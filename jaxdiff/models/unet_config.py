"""``UNetConfig``: the UNet's hyper-parameters as a small frozen dataclass.

Every field is validated when the config is built (a ``ValueError`` naming the field: bools must be
bools, not strings such as ``"False"``; numbers must be numbers in range); every model input is
checked when the model is traced, by :mod:`jaxdiff.models.unet_inputs`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxdiff.validation import check_bool, check_choice, check_float, check_int

__all__ = [
    "UNetConfig", "ATTENTION_KINDS", "ATTENTION_IMPLEMENTATIONS",
    "CLASS_CONDITIONING", "ADDED_CONDITIONING", "ADDED_COND_KEYS",
]  # fmt: skip

ATTENTION_KINDS = (None, "self", "cross")
ATTENTION_IMPLEMENTATIONS = (None, "xla", "cudnn")
CLASS_CONDITIONING = ("embedding", "cross_attention")
ADDED_CONDITIONING = (None, "text_time")
ADDED_COND_KEYS = ("text_embeds", "time_ids")  # the keys of ``added_cond`` (diffusers' names)


def _per_level(name: str, value, n: int, *, allow_none: bool = False) -> tuple:
    if isinstance(value, (list, tuple)):
        value = tuple(value)
        if len(value) != n:
            raise ValueError(f"{name} must have one entry per level ({n}), got {value!r}")
    else:
        value = (value,) * n
    for v in value:
        if v is None and allow_none:
            continue
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must hold positive ints, got {value!r}")
    return value


def _float_dtype(name: str, value) -> np.dtype:
    # np.dtype(None) is float64: None must not silently become a dtype.
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
class UNetConfig:
    """The UNet's hyper-parameters (see :class:`jaxdiff.models.UNet`).

    Attributes:
      in_channels, out_channels: image channels in and out.
      block_channels: channels per resolution level; every level but the last halves the size.
      layers_per_block: resnets per level on the way down (``+ 1`` on the way up); int or one per
        level.
      attention: per level, ``None``, ``"self"`` (spatial self-attention, diffusers
        ``AttnDownBlock2D``) or ``"cross"`` (a cross-attention transformer,
        ``CrossAttnDownBlock2D``).
      up_attention: the same for the up path, per level (index 0 = full resolution); ``None``
        mirrors ``attention``.
      mid_block: whether there is a middle block; ``mid_attention``: its attention kind;
        ``mid_layers``: (attention, resnet) pairs after its first resnet (``0``: one resnet).
      attention_head_dim: channels per head (diffusers ``UNet2DModel.attention_head_dim``);
        ``num_heads``: heads, int or per level (diffusers ``UNet2DConditionModel``'s
        ``attention_head_dim``, which means heads there). At most one of the two; neither: one head.
      transformer_depth: transformer blocks per cross-attention layer, int or per level.
      use_linear_projection: the transformers' ``proj_in``/``proj_out`` as linear layers.
      context_dim: the cross-attention context width ``D`` of ``context: [B, L, D]``.
      norm_groups, norm_eps: GroupNorm of the resnets, self-attention and output norm.
      dropout: the resnets' dropout rate.
      mid_block_scale_factor: the mid block's residual divisor.
      time_embed_dim: the time-embedding width (default ``4 * block_channels[0]``).
      flip_sin_to_cos, freq_shift: the sinusoidal embedding's layout (``cos`` first) and
        ``downscale_freq_shift`` (see :func:`jaxdiff.models.timestep_embedding`).
      num_classes: class conditioning on ``num_classes`` labels plus the null label
        ``num_classes`` (the table has ``num_classes + 1`` rows); ``None`` for none.
      class_conditioning: ``"embedding"`` (added to the time embedding, as diffusers'
        ``num_class_embeds``) or ``"cross_attention"`` (``num_class_tokens`` learned tokens of
        width ``context_dim`` fed to the cross-attention layers as context).
      added_cond: an extra embedding added to the time embedding: ``None``, or ``"text_time"``
        (diffusers' ``addition_embed_type="text_time"``, SDXL's micro-conditioning): the call's
        ``added_cond={"text_embeds": [B, P], "time_ids": [B, K]}`` becomes ``[text_embeds,
        sinusoid(time_ids)]`` (each time id embedded with ``added_time_dim`` features, laid out as
        the time embedding: ``flip_sin_to_cos``, ``freq_shift``), through a two-layer MLP
        (``add_embedding``) of input width ``added_cond_input_dim = P + K * added_time_dim``.
      added_time_dim: features per time id (diffusers' ``addition_time_embed_dim``); set iff
        ``added_cond`` is.
      added_cond_input_dim: the MLP's input width (diffusers'
        ``projection_class_embeddings_input_dim``: 2816 = 1280 + 6 x 256 for SDXL base, 2560 =
        1280 + 5 x 256 for the refiner); set iff ``added_cond`` is, and larger than
        ``added_time_dim``.
      time_cond_dim: the width of the call's ``timestep_cond: [B, time_cond_dim]`` (diffusers'
        ``time_cond_proj_dim``: an LCM-distilled UNet's guidance-scale embedding, see
        :func:`jaxdiff.models.guidance_scale_embedding`), projected without bias
        (``time_embedding/cond_proj``) and added to the sinusoidal time features before the time
        MLP; ``None``: no such input.
      center_input_sample: feed ``2 x - 1`` instead of ``x``.
      dtype: computation dtype (``bfloat16`` works); param_dtype: parameter dtype. Both must be
        floating dtypes.
      attention_implementation: ``jax.nn.dot_product_attention``'s ``implementation``: ``None``
        (JAX's default, the XLA path) or ``"xla"`` run everywhere; ``"cudnn"`` is cuDNN's fused
        flash attention, which needs a GPU with cuDNN and ``dtype`` bfloat16 or float16, and
        raises at trace time otherwise.
      remat: gradient checkpointing: ``nn.remat`` on every down, mid and up block, so that the
        backward pass recomputes a block's activations instead of keeping them (less memory,
        about one more forward pass of compute). Same parameter tree, outputs and gradients.

    Raises:
      ValueError: naming the field, for any field of the wrong type or out of range: the bool
        fields (``mid_block``, ``use_linear_projection``, ``flip_sin_to_cos``,
        ``center_input_sample``) must be bools (a string such as ``"False"`` is rejected: it is
        truthy); counts and widths ints >= 1 (``mid_layers`` >= 0); ``norm_eps`` and
        ``mid_block_scale_factor`` finite numbers > 0; ``dropout`` in [0, 1); ``freq_shift`` a
        finite number; the string fields one of their choices; and the cross-field rules
        (heads that split the channels, ``context_dim`` iff a cross-attention layer, ...).
    """

    in_channels: int = 3
    out_channels: int = 3
    block_channels: tuple[int, ...] = (64, 128, 256)
    layers_per_block: int | tuple[int, ...] = 2
    attention: tuple[str | None, ...] = (None, "self", "self")
    up_attention: tuple[str | None, ...] | None = None
    mid_block: bool = True
    mid_attention: str | None = "self"
    mid_layers: int = 1
    attention_head_dim: int | None = None
    num_heads: int | tuple[int, ...] | None = None
    transformer_depth: int | tuple[int, ...] = 1
    use_linear_projection: bool = False
    context_dim: int | None = None
    norm_groups: int = 32
    norm_eps: float = 1e-5
    dropout: float = 0.0
    mid_block_scale_factor: float = 1.0
    time_embed_dim: int | None = None
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    num_classes: int | None = None
    class_conditioning: str = "embedding"
    num_class_tokens: int = 1
    added_cond: str | None = None
    added_time_dim: int | None = None
    added_cond_input_dim: int | None = None
    time_cond_dim: int | None = None
    center_input_sample: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_implementation: str | None = None
    remat: bool = False

    def __post_init__(self):
        # Lists become tuples (the config must stay hashable: it is a Flax module attribute) and
        # scalar fields become Python int / float / bool; per-level values are not rewritten, so
        # ``dataclasses.replace`` re-derives them.
        for name in ("block_channels", "layers_per_block", "attention", "up_attention",
                     "num_heads", "transformer_depth"):  # fmt: skip
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if not isinstance(self.block_channels, tuple) or not self.block_channels:
            raise ValueError(
                f"block_channels must be a non-empty tuple of ints, one per level, "
                f"got {self.block_channels!r}"
            )
        chans = _per_level("block_channels", self.block_channels, len(self.block_channels))
        n = len(chans)
        for name in ("in_channels", "out_channels", "norm_groups", "num_class_tokens"):
            object.__setattr__(self, name, check_int(name, getattr(self, name), minimum=1))
        for name in ("attention_head_dim", "context_dim", "num_classes", "time_embed_dim",
                     "added_time_dim", "added_cond_input_dim", "time_cond_dim"):  # fmt: skip
            if getattr(self, name) is not None:
                object.__setattr__(self, name, check_int(name, getattr(self, name), minimum=1))
        object.__setattr__(self, "mid_layers", check_int("mid_layers", self.mid_layers, minimum=0))
        for name in ("mid_block", "use_linear_projection", "flip_sin_to_cos",
                     "center_input_sample", "remat"):  # fmt: skip
            object.__setattr__(self, name, check_bool(name, getattr(self, name)))
        floats = {
            "norm_eps": dict(minimum=0.0, exclusive_minimum=True),
            "dropout": dict(minimum=0.0, maximum=1.0, exclusive_maximum=True),
            "mid_block_scale_factor": dict(minimum=0.0, exclusive_minimum=True),
            "freq_shift": {},
        }
        for name, bounds in floats.items():
            object.__setattr__(self, name, check_float(name, getattr(self, name), **bounds))
        check_choice("mid_attention", self.mid_attention, ATTENTION_KINDS)
        check_choice("class_conditioning", self.class_conditioning, CLASS_CONDITIONING)
        check_choice("added_cond", self.added_cond, ADDED_CONDITIONING)
        self._check_added_cond()
        check_choice("attention_implementation", self.attention_implementation,
                     ATTENTION_IMPLEMENTATIONS)
        _per_level("layers_per_block", self.layers_per_block, n)
        _per_level("transformer_depth", self.transformer_depth, n)
        for name in ("attention", "up_attention"):
            value = getattr(self, name)
            if value is None and name == "up_attention":
                continue
            if not isinstance(value, tuple) or len(value) != n:
                raise ValueError(f"{name} must have one entry per level ({n}), got {value!r}")
            if any(v not in ATTENTION_KINDS for v in value):
                raise ValueError(f"{name} entries must be one of {ATTENTION_KINDS}, got {value!r}")
        if self.attention_head_dim is not None and self.num_heads is not None:
            raise ValueError("give at most one of attention_head_dim and num_heads")
        if self.num_heads is not None:
            _per_level("num_heads", self.num_heads, n)
        kinds = {*self.attention, *self.up_kinds}
        has_mid_attention = self.mid_block and self.mid_layers and self.mid_attention
        if has_mid_attention:
            kinds.add(self.mid_attention)
        for l, c in enumerate(chans):
            if c % self.norm_groups:
                raise ValueError(f"block_channels {chans} must be divisible by norm_groups")
            attends = self.attention[l] or self.up_kinds[l] or (has_mid_attention and l == n - 1)
            if not attends:
                continue
            if self.heads(l) > c:
                raise ValueError(
                    f"num_heads={self.num_heads}: level {l} has {self.heads(l)} heads but only "
                    f"block_channels[{l}]={c} channels"
                )
            width = self.attention_head_dim or c // self.heads(l)
            if c % width or c // width != self.heads(l):
                raise ValueError(
                    f"block_channels[{l}]={c} does not split into heads "
                    f"(attention_head_dim={self.attention_head_dim}, num_heads={self.num_heads})"
                )
        if "cross" in kinds:
            if self.context_dim is None:
                raise ValueError("context_dim is required by the cross-attention layers")
        elif self.context_dim is not None:
            raise ValueError("context_dim is set but no layer has cross-attention ('cross')")
        if self.num_classes is not None:
            if self.class_conditioning == "cross_attention" and "cross" not in kinds:
                raise ValueError(
                    "class_conditioning='cross_attention' needs a cross-attention layer ('cross')"
                )
        object.__setattr__(self, "dtype", _float_dtype("dtype", self.dtype))
        object.__setattr__(self, "param_dtype", _float_dtype("param_dtype", self.param_dtype))

    def _check_added_cond(self):
        dims = {"added_time_dim": self.added_time_dim,
                "added_cond_input_dim": self.added_cond_input_dim}  # fmt: skip
        if self.added_cond is None:
            given = [k for k, v in dims.items() if v is not None]
            if given:
                raise ValueError(f"{', '.join(given)} set but added_cond=None (they size the "
                                 "'text_time' embedding: set added_cond='text_time')")
            return
        missing = [k for k, v in dims.items() if v is None]
        if missing:
            raise ValueError(f"added_cond={self.added_cond!r} needs {' and '.join(missing)}")
        if self.added_time_dim // 2 - self.freq_shift == 0:
            raise ValueError(f"added_time_dim={self.added_time_dim} with freq_shift="
                             f"{self.freq_shift} divides by zero in the time ids' sinusoids")
        if self.added_cond_input_dim <= self.added_time_dim:
            raise ValueError(
                f"added_cond_input_dim={self.added_cond_input_dim} must exceed added_time_dim="
                f"{self.added_time_dim} (it is text_embeds' width + n_time_ids * added_time_dim)"
            )

    # Derived quantities ---------------------------------------------------------------------

    @property
    def up_kinds(self) -> tuple[str | None, ...]:
        """The up path's attention kind per level (``up_attention``, or ``attention`` mirrored)."""
        return self.attention if self.up_attention is None else self.up_attention

    @property
    def time_dim(self) -> int:
        """The time-embedding width."""
        return self.time_embed_dim or 4 * self.block_channels[0]

    def layers(self, level: int) -> int:
        """Resnets of down block ``level``."""
        return _at(self.layers_per_block, level)

    def depth(self, level: int) -> int:
        """Transformer blocks of the cross-attention layers at ``level``."""
        return _at(self.transformer_depth, level)

    def heads(self, level: int) -> int:
        """Attention heads at ``level`` (the mid block uses the last level's)."""
        if self.num_heads is not None:
            return _at(self.num_heads, level)
        if self.attention_head_dim is not None:
            return max(self.block_channels[level] // self.attention_head_dim, 1)
        return 1

    @property
    def has_cross_attention(self) -> bool:
        """Whether any layer cross-attends to a context."""
        return self.context_dim is not None

    @property
    def needs_context(self) -> bool:
        """Whether ``context`` is a required input (cross-attention without class tokens)."""
        return self.has_cross_attention and not (
            self.num_classes is not None and self.class_conditioning == "cross_attention"
        )


def _at(value, level: int) -> int:
    return value[level] if isinstance(value, tuple) else value
