"""Pipelines: load a diffusers-format Stable Diffusion folder and generate images with it
(text-to-image and image-to-image) as one jitted program per setting; write one back
(``save_stable_diffusion``)."""

from jaxdiff.pipelines.export import (
    export_stable_diffusion,
    save_stable_diffusion,
    save_tokenizer,
)
from jaxdiff.pipelines.loading import (
    SUPPORTED_PIPELINES,
    StableDiffusion,
    choose_sampler,
    load_stable_diffusion,
    with_sampler,
)
from jaxdiff.pipelines.stable_diffusion import (
    StableDiffusionOutput,
    encode_prompt,
    generate,
    save_images,
    to_uint8,
)

__all__ = [
    "SUPPORTED_PIPELINES",
    "StableDiffusion",
    "StableDiffusionOutput",
    "choose_sampler",
    "encode_prompt",
    "export_stable_diffusion",
    "generate",
    "load_stable_diffusion",
    "save_images",
    "save_stable_diffusion",
    "save_tokenizer",
    "to_uint8",
    "with_sampler",
]
