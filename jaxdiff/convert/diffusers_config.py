"""diffusers UNet config dicts -> :class:`jaxdiff.models.UNetConfig`.

Every option of ``UNet2DModel`` and ``UNet2DConditionModel`` (diffusers 0.42) is either mapped,
known to have no effect on the supported blocks, or rejected with a ``ValueError`` naming it;
none is silently dropped. Missing keys take diffusers' defaults.
"""

from __future__ import annotations

from typing import Any, Mapping

from jaxdiff.models.unet_config import UNetConfig

__all__ = ["unet_config_from_diffusers", "UNET2D_DEFAULTS", "UNET2D_CONDITION_DEFAULTS"]

# diffusers 0.42 constructor defaults (the keys a saved config.json holds).
UNET2D_DEFAULTS: dict[str, Any] = dict(
    sample_size=None, in_channels=3, out_channels=3, center_input_sample=False,
    time_embedding_type="positional", time_embedding_dim=None, freq_shift=0, flip_sin_to_cos=True,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    mid_block_type="UNetMidBlock2D",
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(224, 448, 672, 896), layers_per_block=2, mid_block_scale_factor=1,
    downsample_padding=1, downsample_type="conv", upsample_type="conv", dropout=0.0, act_fn="silu",
    attention_head_dim=8, norm_num_groups=32, attn_norm_num_groups=None, norm_eps=1e-5,
    resnet_time_scale_shift="default", add_attention=True, class_embed_type=None,
    num_class_embeds=None, num_train_timesteps=None,
)  # fmt: skip
UNET2D_CONDITION_DEFAULTS: dict[str, Any] = dict(
    sample_size=None, in_channels=4, out_channels=4, center_input_sample=False,
    flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                      "DownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                    "CrossAttnUpBlock2D"),
    only_cross_attention=False, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    downsample_padding=1, mid_block_scale_factor=1, dropout=0.0, act_fn="silu",
    norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=1280, transformer_layers_per_block=1,
    reverse_transformer_layers_per_block=None, encoder_hid_dim=None, encoder_hid_dim_type=None,
    attention_head_dim=8, num_attention_heads=None, dual_cross_attention=False,
    use_linear_projection=False, class_embed_type=None, addition_embed_type=None,
    addition_time_embed_dim=None, num_class_embeds=None, upcast_attention=False,
    resnet_time_scale_shift="default", resnet_skip_time_act=False, resnet_out_scale_factor=1.0,
    time_embedding_type="positional", time_embedding_dim=None, time_embedding_act_fn=None,
    timestep_post_act=None, time_cond_proj_dim=None, conv_in_kernel=3, conv_out_kernel=3,
    projection_class_embeddings_input_dim=None, attention_type="default",
    class_embeddings_concat=False, mid_block_only_cross_attention=None, cross_attention_norm=None,
    addition_embed_type_num_heads=64,
)  # fmt: skip

# Options that cannot change the supported blocks' maths: informational, or read only by block
# types this converter rejects (ResnetDownsampleBlock2D, SimpleCrossAttn*, ...), or unused by
# diffusers' default attention processor (upcast_attention under AttnProcessor2_0).
_NO_EFFECT = {
    "sample_size", "num_train_timesteps", "upcast_attention", "resnet_skip_time_act",
    "resnet_out_scale_factor", "addition_embed_type_num_heads",
}  # fmt: skip
# Options that must keep their default: anything else is unsupported.
_MUST_BE = {
    "time_embedding_type": ("positional",), "downsample_padding": (1,),
    "downsample_type": ("conv",), "upsample_type": ("conv",), "act_fn": ("silu", "swish"),
    "resnet_time_scale_shift": ("default",), "class_embed_type": (None,),
    "encoder_hid_dim": (None,), "encoder_hid_dim_type": (None,), "num_attention_heads": (None,),
    "dual_cross_attention": (False,), "addition_embed_type": (None, "text_time"),
    "time_embedding_act_fn": (None,), "timestep_post_act": (None,),
    "conv_in_kernel": (3,), "conv_out_kernel": (3,),
    "attention_type": ("default",), "class_embeddings_concat": (False,),
    "mid_block_only_cross_attention": (None, False), "cross_attention_norm": (None,),
    "reverse_transformer_layers_per_block": (None,),
}  # fmt: skip
_DOWN = {
    "UNet2DModel": {"DownBlock2D": None, "AttnDownBlock2D": "self"},
    "UNet2DConditionModel": {"DownBlock2D": None, "CrossAttnDownBlock2D": "cross"},
}
_UP = {
    "UNet2DModel": {"UpBlock2D": None, "AttnUpBlock2D": "self"},
    "UNet2DConditionModel": {"UpBlock2D": None, "CrossAttnUpBlock2D": "cross"},
}


def _model_class(config: Mapping, model_class: str | None) -> str:
    name = model_class or config.get("_class_name")
    if name is None:
        if "cross_attention_dim" in config or "encoder_hid_dim" in config:
            name = "UNet2DConditionModel"
        elif {"add_attention", "downsample_type", "attn_norm_num_groups"} & set(config):
            name = "UNet2DModel"
        else:
            raise ValueError(
                "cannot tell UNet2DModel from UNet2DConditionModel: pass model_class="
            )
    if name not in _DOWN:
        raise ValueError(f"model_class must be UNet2DModel or UNet2DConditionModel, got {name!r}")
    return name


def _block_kinds(name: str, types, table: Mapping) -> tuple:
    kinds = []
    for t in types:
        t = t[7:] if t.startswith("UNetRes") else t
        if t not in table:
            raise ValueError(
                f"{name}: block type {t!r} is not supported (supported: {list(table)})"
            )
        kinds.append(table[t])
    return tuple(kinds)


def _uniform(name: str, value) -> Any:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"{name}={value!r}: per-level values are not supported")
        return value[0]
    return value


def unet_config_from_diffusers(
    config: Mapping[str, Any], *, model_class: str | None = None, **overrides
) -> UNetConfig:
    """A diffusers ``UNet2DModel`` / ``UNet2DConditionModel`` config -> :class:`UNetConfig`.

    Args:
      config: ``dict(model.config)`` or a parsed ``config.json``; missing keys take diffusers'
        defaults, keys starting with ``_`` are metadata.
      model_class: ``"UNet2DModel"`` or ``"UNet2DConditionModel"``; default: ``_class_name``, or
        inferred from the keys.
      overrides: :class:`UNetConfig` fields to set on top (``dtype``, ``param_dtype``, ...).

    ``num_class_embeds=N`` maps to ``num_classes=N - 1``: diffusers' labels ``0..N-1`` are
    jaxdiff's ``0..num_classes``, the last one being jaxdiff's null label.
    ``addition_embed_type="text_time"`` (SDXL) maps to ``added_cond="text_time"`` with
    ``added_time_dim = addition_time_embed_dim`` and ``added_cond_input_dim =
    projection_class_embeddings_input_dim``; ``time_cond_proj_dim`` (LCM) to ``time_cond_dim``.
    ``attention_head_dim`` and ``transformer_layers_per_block`` may be per level (SDXL's
    ``[5, 10, 20]`` and ``[1, 2, 10]``); the nested per-block form of
    ``transformer_layers_per_block`` and ``reverse_transformer_layers_per_block`` are rejected.

    Raises:
      ValueError: naming every unknown or unsupported option (block types other than
        Down/AttnDown/CrossAttnDown/Up/AttnUp/CrossAttnUp, scale-shift resnets, Fourier time
        embeddings, class embeddings other than ``num_class_embeds``, addition embeddings other
        than ``"text_time"``, ...).
    """
    kind = _model_class(config, model_class)
    defaults = UNET2D_DEFAULTS if kind == "UNet2DModel" else UNET2D_CONDITION_DEFAULTS
    unknown = sorted(k for k in config if not k.startswith("_") and k not in defaults)
    if unknown:
        raise ValueError(f"unknown {kind} config options: {unknown}")
    c = {**defaults, **{k: v for k, v in config.items() if not k.startswith("_")}}
    bad = [
        f"{k}={c[k]!r} (supported: {allowed})"
        for k, allowed in _MUST_BE.items()
        if k in c and c[k] not in allowed
    ]
    if kind == "UNet2DModel" and c["attn_norm_num_groups"] not in (None, c["norm_num_groups"]):
        bad.append(f"attn_norm_num_groups={c['attn_norm_num_groups']!r} (supported: None)")
    if c["norm_num_groups"] is None:
        bad.append("norm_num_groups=None (supported: an int)")
    if kind == "UNet2DConditionModel" and any(
        _uniform_bool(c["only_cross_attention"])
    ):
        bad.append(f"only_cross_attention={c['only_cross_attention']!r} (supported: False)")
    if kind == "UNet2DConditionModel" and c["addition_embed_type"] is None:
        # read only by the "text_time" embedding and the (rejected) projection class embeddings
        for name in ("projection_class_embeddings_input_dim", "addition_time_embed_dim"):
            if c[name] is not None:
                bad.append(f"{name}={c[name]!r} without addition_embed_type='text_time' "
                           "(supported: None)")
    if bad:
        raise ValueError(f"unsupported {kind} config options: " + "; ".join(bad))

    chans = tuple(c["block_out_channels"])
    n = len(chans)
    if len(c["down_block_types"]) != n or len(c["up_block_types"]) != n:
        raise ValueError("down_block_types, up_block_types and block_out_channels differ in length")
    attention = _block_kinds("down_block_types", c["down_block_types"], _DOWN[kind])
    up = _block_kinds("up_block_types", c["up_block_types"], _UP[kind])[::-1]  # level order
    out: dict[str, Any] = dict(
        in_channels=c["in_channels"], out_channels=c["out_channels"], block_channels=chans,
        layers_per_block=c["layers_per_block"], attention=attention,
        up_attention=None if up == attention else up,
        norm_groups=c["norm_num_groups"], norm_eps=float(c["norm_eps"]),
        dropout=float(c["dropout"]), mid_block_scale_factor=float(c["mid_block_scale_factor"]),
        time_embed_dim=c["time_embedding_dim"], flip_sin_to_cos=bool(c["flip_sin_to_cos"]),
        freq_shift=float(c["freq_shift"]), center_input_sample=bool(c["center_input_sample"]),
    )  # fmt: skip
    mid = c["mid_block_type"]
    if kind == "UNet2DModel":
        out["attention_head_dim"] = c["attention_head_dim"]
        if mid not in ("UNetMidBlock2D", None):
            raise ValueError(f"unsupported mid_block_type={mid!r}")
        out.update(mid_block=mid is not None, mid_layers=1)
        out["mid_attention"] = "self" if c["add_attention"] else None
    else:
        # attention_head_dim means heads here; num_attention_heads was rejected above (_MUST_BE),
        # as diffusers' UNet2DConditionModel itself rejects it.
        heads = c["attention_head_dim"]
        out["num_heads"] = tuple(heads) if isinstance(heads, (list, tuple)) else heads
        tl = c["transformer_layers_per_block"]
        if isinstance(tl, (list, tuple)) and any(isinstance(v, (list, tuple)) for v in tl):
            raise ValueError(
                f"transformer_layers_per_block={tl!r}: nested tuples are not supported"
            )
        out["transformer_depth"] = tuple(tl) if isinstance(tl, (list, tuple)) else tl
        out["use_linear_projection"] = bool(c["use_linear_projection"])
        table = {
            "UNetMidBlock2DCrossAttn": ("cross", 1), "UNetMidBlock2D": (None, 0), None: (None, 0)
        }
        if mid not in table:
            raise ValueError(f"unsupported mid_block_type={mid!r}")
        out.update(mid_block=mid is not None, mid_attention=table[mid][0], mid_layers=table[mid][1])
        if c["addition_embed_type"] == "text_time":
            for name in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
                if c[name] is None:
                    raise ValueError(f"addition_embed_type='text_time' needs {name}")
            out.update(added_cond="text_time", added_time_dim=c["addition_time_embed_dim"],
                       added_cond_input_dim=c["projection_class_embeddings_input_dim"])
        out["time_cond_dim"] = c["time_cond_proj_dim"]
        uses_cross = "cross" in (*attention, *up, out["mid_attention"])
        if uses_cross:
            out["context_dim"] = _uniform("cross_attention_dim", c["cross_attention_dim"])
    if isinstance(out["layers_per_block"], list):
        out["layers_per_block"] = tuple(out["layers_per_block"])
    if c["num_class_embeds"] is not None:
        if c["num_class_embeds"] < 2:
            raise ValueError("num_class_embeds must be >= 2 (one class besides the null label)")
        out.update(num_classes=c["num_class_embeds"] - 1, class_conditioning="embedding")
    out.update(overrides)
    return UNetConfig(**out)


def _uniform_bool(value) -> list[bool]:
    return list(value) if isinstance(value, (list, tuple)) else [bool(value)]
