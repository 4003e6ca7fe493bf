"""diffusers / peft LoRA state dicts: the keys ``StableDiffusionLoraLoaderMixin.save_lora_weights``
writes and ``load_lora_weights`` reads.

Current layout (peft, diffusers >= 0.24)::

    unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight   [r, d_in]
    unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight   [d_out, r]
    unet.down_blocks.1.attentions.0.proj_in.lora_A.weight                           [r, d_in, 1, 1]
    text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight         [r, d_in]
    text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight       [r, d_in]

(conv layers: ``lora_A`` a conv ``[r, d_in, kh, kw]``, ``lora_B`` a 1x1 conv
``[d_out, r, 1, 1]``). The update is ``lora_B @ lora_A`` times ``lora_alpha / r``, where
``lora_alpha`` comes from the file's ``lora_adapter_metadata`` (safetensors metadata, a JSON
``{"unet.r": .., "unet.lora_alpha": .., "unet.alpha_pattern": {..}, "unet.use_rslora": ..}``,
the same under ``text_encoder.`` and SDXL's ``text_encoder_2.``) and is ``r`` (factor 1) when
the file has none. jaxdiff writes no metadata and folds its factor into ``lora_B``.

Also read: the older diffusers layouts ``<module>.lora.down.weight`` / ``.lora.up.weight``
(``LoRACompatibleLinear``), ``<module>.lora_linear_layer.down.weight`` / ``.up.weight`` (text
encoder), the attention-processor layout ``<attn>.processor.to_q_lora.down.weight``, with
optional ``<module>.alpha`` (factor ``alpha / r``); keys with no ``unet.`` / ``text_encoder.``
prefix are UNet keys (as diffusers reads them), or text encoder keys when they start with
``text_model.``; text encoder keys without ``text_model.`` (transformers 5 module names) are
accepted.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping

__all__ = ["is_peft_key", "parse_peft", "peft_factor"]

_DOWN = ("lora_A.weight", "lora.down.weight", "lora_linear_layer.down.weight")
_UP = ("lora_B.weight", "lora.up.weight", "lora_linear_layer.up.weight")
_KEY_RE = re.compile(r"^(?P<module>.+?)\.(?P<kind>" + "|".join(
    re.escape(k) for k in (*_DOWN, *_UP, "alpha")) + r")$")
_TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
_OTHER_MODELS = ("text_encoder_3", "transformer", "prior", "decoder")
_PROCESSOR_RE = re.compile(
    r"^(?P<attn>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<kind>down|up)\.weight$")


def is_peft_key(key: str) -> bool:
    """Whether ``key`` is a LoRA weight key of one of the diffusers / peft layouts."""
    return bool(_PROCESSOR_RE.match(key)) or any(key.endswith("." + k) for k in (*_DOWN, *_UP))


def _canonical(module: str) -> str:
    """``"<part>.<torch module name>"`` as :func:`jaxdiff.convert.lora_names.lora_targets`
    names layers."""
    if module.startswith("unet."):
        return module
    part, _, rest = module.partition(".")
    if part in _TEXT_ENCODERS:  # SDXL's second has a text_projection beside its text_model
        keep = rest.startswith("text_model.") or rest == "text_projection"
        return f"{part}." + (rest if keep else f"text_model.{rest}")
    if module.startswith("text_model."):
        return f"text_encoder.{module}"
    if part in _OTHER_MODELS:  # SD 3's third text encoder, a DiT, ...
        return module
    return f"unet.{module}"


def parse_peft(state_dict: Mapping[str, Any]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Groups a diffusers / peft LoRA state dict by layer.

    Returns:
      ``({"<part>.<module>": {"down": .., "up": .., "alpha": ..}}, unknown keys)``: the layer
      names are canonical (``unet.`` / ``text_encoder.text_model.`` /
      ``text_encoder_2.text_model.`` prefixed, or ``text_encoder_2.text_projection``); a layer
      may lack ``down`` or ``up`` (the caller reports it); ``unknown`` lists keys of no known
      form.
    """
    layers: dict[str, dict[str, Any]] = {}
    unknown = []
    for key, value in state_dict.items():
        proc = _PROCESSOR_RE.match(key)
        if proc:
            proj = "to_out.0" if proc["proj"] == "to_out" else proc["proj"]
            module, kind = f"{proc['attn']}.{proj}", proc["kind"]
        else:
            m = _KEY_RE.match(key)
            if not m:
                unknown.append(key)
                continue
            module, raw = m["module"], m["kind"]
            kind = "down" if raw in _DOWN else "up" if raw in _UP else "alpha"
        entry = layers.setdefault(_canonical(module), {})
        if kind in entry:
            unknown.append(f"{key} (a second {kind} weight for {module})")
            continue
        entry[kind] = value
    return layers, unknown


def _matches(pattern: str, names: tuple[str, ...]) -> bool:
    """peft's rule for ``rank_pattern`` / ``alpha_pattern`` keys: the pattern matches the
    module name or a ``.``-separated tail of it."""
    try:
        rx = re.compile(rf"(.*\.)?({pattern})$")
    except re.error:
        return False
    return any(rx.match(n) for n in names)


def peft_factor(name: str, rank: int, alpha: float | None,
                metadata: Mapping[str, Any] | None) -> float:
    """A layer's factor: ``alpha / rank`` from its ``.alpha`` key, else from the part's peft
    config in ``metadata`` (``lora_alpha``, overridden by a matching ``alpha_pattern``;
    ``use_rslora``: ``alpha / sqrt(rank)``), else 1.

    ``name`` is the canonical ``"<part>.<module>"``.
    """
    if alpha is not None:
        return float(alpha) / rank
    part, module = name.split(".", 1)
    config = {k[len(part) + 1:]: v for k, v in (metadata or {}).items()
              if k.startswith(part + ".")}
    if "lora_alpha" not in config:
        return 1.0
    value = config["lora_alpha"]
    names = (module, module[len("text_model."):]) if module.startswith("text_model.") \
        else (module,)
    for pattern, a in (config.get("alpha_pattern") or {}).items():
        if _matches(pattern, names):
            value = a
            break
    denominator = math.sqrt(rank) if config.get("use_rslora") else rank
    return float(value) / denominator
