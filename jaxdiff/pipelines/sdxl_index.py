"""What an SDXL folder's ``model_index.json`` says beyond the parts: which optional parts it
names (a refiner's ``text_encoder`` / ``tokenizer`` are ``[null, null]``) and the pipeline
flags. Read by :func:`~jaxdiff.pipelines.load_stable_diffusion`."""

from __future__ import annotations

from typing import Any, Mapping

__all__ = ["named_in_index", "sdxl_flags"]


def named_in_index(index: Mapping[str, Any], part: str) -> bool:
    """Whether ``model_index.json`` names ``part`` (an entry other than ``[null, null]``)."""
    entry = index.get(part)
    if isinstance(entry, (list, tuple)):
        return any(e is not None for e in entry)
    return entry is not None


def sdxl_flags(index: Mapping[str, Any], cls: str) -> dict[str, bool]:
    """SDXL's pipeline flags from ``model_index.json`` (of a ``cls`` folder), with diffusers'
    defaults: ``{"force_zeros_for_empty_prompt": True, "requires_aesthetics_score": False}``.

    Raises:
      ValueError: naming the flag: not a bool, or ``requires_aesthetics_score`` for a class other
        than ``StableDiffusionXLImg2ImgPipeline``.
    """
    flags = {"force_zeros_for_empty_prompt": index.get("force_zeros_for_empty_prompt", True),
             "requires_aesthetics_score": index.get("requires_aesthetics_score", False)}
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise ValueError(f"model_index.json: {name} must be true or false, got {value!r}")
    if flags["requires_aesthetics_score"] and cls != "StableDiffusionXLImg2ImgPipeline":
        raise ValueError("model_index.json: requires_aesthetics_score is a refiner's flag "
                         f"(StableDiffusionXLImg2ImgPipeline), not a {cls}'s")
    return flags
