"""LoRA: low-rank adapters as a transform of the parameter tree (:mod:`jaxdiff.lora.core`)."""

from jaxdiff.lora.core import (TEXT_ATTENTION, UNET_ATTENTION, UNET_FEED_FORWARD, check_lora,
                               init_lora, layer_path, lora_delta, lora_layers, lora_param_count,
                               lora_rank, lora_scale, merge_lora, merge_loras)

__all__ = ["UNET_ATTENTION", "UNET_FEED_FORWARD", "TEXT_ATTENTION", "lora_layers", "init_lora",
           "lora_delta", "merge_lora", "merge_loras", "check_lora", "lora_scale", "lora_rank",
           "lora_param_count", "layer_path"]
