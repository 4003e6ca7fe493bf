"""PyTorch (diffusers, transformers) checkpoints -> jaxdiff configs and Flax params, and back."""

from jaxdiff.convert.diffusers_config import unet_config_from_diffusers
from jaxdiff.convert.diffusers_controlnet import (
    controlnet_config_from_diffusers,
    controlnet_from_diffusers,
    convert_controlnet_state_dict,
)
from jaxdiff.convert.diffusers_scheduler import (
    ignored_config_keys,
    sampler_from_diffusers_config,
    sampler_options_from_diffusers_config,
    schedule_from_diffusers_config,
    scheduler_classes,
)
from jaxdiff.convert.diffusers_unet import convert_unet_state_dict, from_diffusers
from jaxdiff.convert.diffusers_vae import (
    convert_vae_state_dict,
    vae_config_from_diffusers,
    vae_from_diffusers,
)
from jaxdiff.convert.export_diffusers import (
    clip_text_config_to_transformers,
    clip_text_to_transformers,
    params_to_state_dict,
    save_safetensors,
    unet_config_to_diffusers,
    unet_to_diffusers,
    vae_config_to_diffusers,
    vae_to_diffusers,
)
from jaxdiff.convert.export_controlnet import (
    controlnet_config_to_diffusers,
    controlnet_to_diffusers,
    save_controlnet,
)
from jaxdiff.convert.export_scheduler import scheduler_to_diffusers
from jaxdiff.convert.lora_files import (
    LORA_WEIGHT_NAME,
    lora_format,
    lora_state_dict,
    read_lora,
    read_lora_state_dict,
    save_lora,
)
from jaxdiff.convert.lora_names import lora_targets
from jaxdiff.convert.torch_io import (
    flax_to_torch,
    load_sharded_state_dict,
    load_torch_state_dict,
    rename_legacy_attention_keys,
    to_numpy,
    torch_key,
    torch_to_flax,
)
from jaxdiff.convert.transformers_clip import (
    clip_text_config_from_transformers,
    clip_text_from_transformers,
    convert_clip_text_state_dict,
    load_clip_text_encoder,
)

__all__ = [
    "LORA_WEIGHT_NAME",
    "clip_text_config_from_transformers",
    "clip_text_config_to_transformers",
    "clip_text_to_transformers",
    "clip_text_from_transformers",
    "controlnet_config_from_diffusers",
    "controlnet_config_to_diffusers",
    "controlnet_from_diffusers",
    "controlnet_to_diffusers",
    "convert_controlnet_state_dict",
    "convert_clip_text_state_dict",
    "convert_unet_state_dict",
    "convert_vae_state_dict",
    "flax_to_torch",
    "from_diffusers",
    "load_clip_text_encoder",
    "load_sharded_state_dict",
    "load_torch_state_dict",
    "lora_format",
    "lora_state_dict",
    "lora_targets",
    "params_to_state_dict",
    "read_lora",
    "read_lora_state_dict",
    "rename_legacy_attention_keys",
    "sampler_from_diffusers_config",
    "sampler_options_from_diffusers_config",
    "ignored_config_keys",
    "save_controlnet",
    "save_lora",
    "save_safetensors",
    "scheduler_to_diffusers",
    "schedule_from_diffusers_config",
    "scheduler_classes",
    "to_numpy",
    "torch_key",
    "torch_to_flax",
    "unet_config_from_diffusers",
    "unet_config_to_diffusers",
    "unet_to_diffusers",
    "vae_config_from_diffusers",
    "vae_config_to_diffusers",
    "vae_from_diffusers",
    "vae_to_diffusers",
]
