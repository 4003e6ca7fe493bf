"""PyTorch (diffusers) checkpoints -> jaxdiff configs and Flax params."""

from jaxdiff.convert.diffusers_config import unet_config_from_diffusers
from jaxdiff.convert.diffusers_scheduler import (
    sampler_from_diffusers_config,
    schedule_from_diffusers_config,
)
from jaxdiff.convert.diffusers_unet import (
    convert_unet_state_dict,
    from_diffusers,
    load_torch_state_dict,
    torch_key,
)

__all__ = [
    "convert_unet_state_dict",
    "from_diffusers",
    "load_torch_state_dict",
    "sampler_from_diffusers_config",
    "schedule_from_diffusers_config",
    "torch_key",
    "unet_config_from_diffusers",
]
