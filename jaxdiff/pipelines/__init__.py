"""Pipelines: load a diffusers-format Stable Diffusion folder and generate images with it
(text-to-image and image-to-image) as one jitted program per setting, cached by its static
settings; write one back (``save_stable_diffusion``); LoRAs fused or unfused (``load_lora``); the
settings a folder was measured with (``jaxdiff_generation.json``: ``GenerationDefaults``,
``crop_images``); SDXL folders load into the same ``StableDiffusion`` and run through the same
``generate`` (its two-encoder prompt encoding ``encode_sdxl_prompts`` and micro-conditioning
``sdxl_time_ids``), and export back (``export_stable_diffusion_xl``)."""

from jaxdiff.pipelines.controlnet import load_controlnet
from jaxdiff.pipelines.export import (
    export_stable_diffusion,
    save_stable_diffusion,
    save_tokenizer,
)
from jaxdiff.pipelines.export_sdxl import export_stable_diffusion_xl
from jaxdiff.pipelines.checkpoint_files import LoadOptionError
from jaxdiff.pipelines.generation_defaults import (
    GENERATION_DEFAULTS_FILE,
    GenerationDefaults,
    crop_images,
    read_generation_defaults,
    write_generation_defaults,
)
from jaxdiff.pipelines.images import (
    check_output_path,
    load_image,
    prepare_image,
    save_images,
    to_uint8,
)
from jaxdiff.pipelines.loading import (
    SUPPORTED_PIPELINES,
    StableDiffusion,
    check_tokenizer,
    choose_sampler,
    load_stable_diffusion,
    with_sampler,
)
from jaxdiff.pipelines.lora import fuse_lora, load_lora, set_lora_scales, unload_loras
from jaxdiff.pipelines.program_cache import ProgramCache
from jaxdiff.pipelines.sd_program import PROGRAM_CACHE, ProgramKey
from jaxdiff.pipelines.sdxl_conditioning import (
    TimeIds,
    check_add_embedding_dim,
    sdxl_time_ids,
)
from jaxdiff.pipelines.sdxl_text import (
    SDXLEmbeddings,
    SDXLTokens,
    check_sdxl_clip_skip,
    check_sdxl_text_encoders,
    encode_sdxl_prompt,
    encode_sdxl_prompts,
    negative_is_zeros,
    tokenize_sdxl_prompts,
)
from jaxdiff.pipelines.stable_diffusion import (
    MAX_IMAGE_SIDE,
    StableDiffusionOutput,
    encode_prompt,
    generate,
)

__all__ = [
    "GENERATION_DEFAULTS_FILE",
    "GenerationDefaults",
    "MAX_IMAGE_SIDE",
    "PROGRAM_CACHE",
    "SUPPORTED_PIPELINES",
    "LoadOptionError",
    "ProgramCache",
    "ProgramKey",
    "SDXLEmbeddings",
    "SDXLTokens",
    "StableDiffusion",
    "StableDiffusionOutput",
    "TimeIds",
    "check_add_embedding_dim",
    "export_stable_diffusion_xl",
    "check_output_path",
    "check_sdxl_clip_skip",
    "check_sdxl_text_encoders",
    "check_tokenizer",
    "choose_sampler",
    "crop_images",
    "encode_prompt",
    "encode_sdxl_prompt",
    "encode_sdxl_prompts",
    "export_stable_diffusion",
    "fuse_lora",
    "generate",
    "load_controlnet",
    "load_image",
    "load_lora",
    "load_stable_diffusion",
    "negative_is_zeros",
    "prepare_image",
    "read_generation_defaults",
    "save_images",
    "save_stable_diffusion",
    "save_tokenizer",
    "sdxl_time_ids",
    "set_lora_scales",
    "to_uint8",
    "tokenize_sdxl_prompts",
    "unload_loras",
    "with_sampler",
    "write_generation_defaults",
]
