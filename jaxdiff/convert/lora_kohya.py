"""kohya-ss / A1111 LoRA state dicts (``sd-scripts``' ``networks/lora.py`` layout)::

    lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight [r, d_in]
    lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight   [d_out, r]
    lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.alpha            []
    lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight                 [r, d_in]

A layer's name is ``lora_unet_`` / ``lora_te_`` (or ``lora_te1_``; SDXL's second text encoder
``lora_te2_``) followed by its torch module name with every ``.`` replaced by ``_``. UNet layers are
named either by diffusers' modules (``down_blocks_1_attentions_0_...``, as sd-scripts trains
SD 1.x / 2.x) or by the original LDM / SGM UNet's (``input_blocks_4_1_...``, ``middle_block_1_...``,
``output_blocks_...``: sd-scripts' SDXL trainer, some A1111 LoRAs), which
:mod:`jaxdiff.convert.lora_ldm` maps from the model's UNet config. Module names hold ``_`` too
(``transformer_blocks``, ``to_q``), so the replacement cannot be undone by rule: names are resolved
against the model's own layers (:func:`kohya_names`). The update is ``lora_up @ lora_down`` times
``alpha / r`` (``r`` the layer's rank; factor 1 without an ``.alpha``). Conv layers (LoCon) have
``lora_down`` ``[r, d_in, kh, kw]`` and ``lora_up`` ``[d_out, r, 1, 1]``.

Not read (they give the unknown-keys error): LyCORIS' other adapters (``hada_``, ``lokr_``),
DoRA's ``dora_scale``, and LDM-named UNet keys when no UNet config is given.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from jaxdiff.convert.lora_ldm import ldm_unet_names
from jaxdiff.models.unet_config import UNetConfig

__all__ = ["KOHYA_PREFIXES", "is_kohya_key", "kohya_names", "has_ldm_unet_keys", "parse_kohya"]

KOHYA_PREFIXES = {"unet": ("lora_unet_",), "text_encoder": ("lora_te_", "lora_te1_"),
                  "text_encoder_2": ("lora_te2_",)}
"""kohya's name prefixes of each part (``lora_te1_`` is SDXL's first text encoder, SD's CLIP;
``lora_te2_`` SDXL's second)."""
_LDM_PREFIXES = ("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_")
_KINDS = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}


def is_kohya_key(key: str) -> bool:
    """Whether ``key`` looks like a kohya LoRA key (``lora_unet_...`` / ``lora_te_...``)."""
    return key.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_"))


def kohya_names(targets: Iterable[str],
                unet_config: UNetConfig | None = None) -> dict[str, str]:
    """``{kohya layer name: "<part>.<module>"}`` for the canonical layer names ``targets``
    (:func:`jaxdiff.convert.lora_names.lora_targets`' keys).

    Text encoder layers are named with and without ``text_model.`` (``lora_te_text_model_encoder_
    ...``, as sd-scripts writes them, and ``lora_te_encoder_...``, transformers 5's module names).
    With ``unet_config`` (the model's UNet config) the UNet's layers are also named by their
    LDM / SGM modules (``lora_unet_input_blocks_4_1_...``; :mod:`jaxdiff.convert.lora_ldm`).
    """
    out = {}
    unet = []
    for target in targets:
        part, module = target.split(".", 1)
        for prefix in KOHYA_PREFIXES.get(part, ()):
            out[prefix + module.replace(".", "_")] = target
            if part != "unet" and module.startswith("text_model."):  # transformers 5's names
                out[prefix + module[len("text_model."):].replace(".", "_")] = target
        if part == "unet":
            unet.append(module)
    if unet_config is not None:
        for ldm, module in ldm_unet_names(unet_config, unet).items():
            out["lora_unet_" + ldm.replace(".", "_")] = f"unet.{module}"
    return out


def has_ldm_unet_keys(keys: Iterable[str]) -> bool:
    """Whether any of ``keys`` names a UNet layer by the LDM / SGM modules
    (``lora_unet_input_blocks_``, ``lora_unet_middle_block_``, ``lora_unet_output_blocks_``)."""
    return any(k.startswith(_LDM_PREFIXES) for k in keys)


def parse_kohya(state_dict: Mapping[str, Any],
                names: Mapping[str, str]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Groups a kohya LoRA state dict by layer, resolving names with ``names``
    (:func:`kohya_names`).

    Returns:
      ``({"<part>.<module>": {"down": .., "up": .., "alpha": ..}}, unknown keys)``: ``unknown``
      lists the keys whose layer is not in the model or whose suffix is not ``lora_down.weight``,
      ``lora_up.weight`` or ``alpha``.
    """
    layers: dict[str, dict[str, Any]] = {}
    unknown = []
    for key, value in state_dict.items():
        name, _, suffix = key.partition(".")
        target = names.get(name)
        if target is None or suffix not in _KINDS:
            unknown.append(key)
            continue
        layers.setdefault(target, {})[_KINDS[suffix]] = value
    return layers, unknown
