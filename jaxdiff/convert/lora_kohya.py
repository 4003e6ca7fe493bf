"""kohya-ss / A1111 LoRA state dicts (``sd-scripts``' ``networks/lora.py`` layout)::

    lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight [r, d_in]
    lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight   [d_out, r]
    lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.alpha            []
    lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight                 [r, d_in]

A layer's name is ``lora_unet_`` / ``lora_te_`` (or ``lora_te1_``) followed by its torch module
name with every ``.`` replaced by ``_``. Module names hold ``_`` too (``transformer_blocks``,
``to_q``), so the replacement cannot be undone by rule: names are resolved against the model's
own layers (:func:`kohya_names`). The update is ``lora_up @ lora_down`` times ``alpha / r``
(``r`` the layer's rank; factor 1 without an ``.alpha``). Conv layers (LoCon) have ``lora_down``
``[r, d_in, kh, kw]`` and ``lora_up`` ``[d_out, r, 1, 1]``.

Not read (they give the unknown-keys error): LyCORIS' other adapters (``hada_``, ``lokr_``),
DoRA's ``dora_scale``, SDXL's ``lora_te2_``, and LoRAs on the original LDM UNet's names
(``lora_unet_input_blocks_...``).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

__all__ = ["KOHYA_PREFIXES", "is_kohya_key", "kohya_names", "parse_kohya"]

KOHYA_PREFIXES = {"unet": ("lora_unet_",), "text_encoder": ("lora_te_", "lora_te1_")}
"""kohya's name prefix of each part (``lora_te1_`` is SDXL's first text encoder, SD's CLIP)."""
_KINDS = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}


def is_kohya_key(key: str) -> bool:
    """Whether ``key`` looks like a kohya LoRA key (``lora_unet_...`` / ``lora_te_...``)."""
    return key.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_"))


def kohya_names(targets: Iterable[str]) -> dict[str, str]:
    """``{kohya layer name: "<part>.<module>"}`` for the canonical layer names ``targets``
    (:func:`jaxdiff.convert.lora_names.lora_targets`' keys)."""
    out = {}
    for target in targets:
        part, module = target.split(".", 1)
        for prefix in KOHYA_PREFIXES.get(part, ()):
            out[prefix + module.replace(".", "_")] = target
    return out


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
