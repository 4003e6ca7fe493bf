"""Flax linen modules: embeddings, resnet blocks, attention, the UNet, the ControlNet, the KL
autoencoder and the CLIP text encoder."""

from jaxdiff.models.attention import (
    BasicTransformerBlock,
    FeedForward,
    MultiHeadAttention,
    SpatialSelfAttention,
    Transformer2D,
)
from jaxdiff.models.autoencoder import (
    AutoencoderKL,
    DiagonalGaussian,
    autoencoder_param_shapes,
    init_autoencoder,
)
from jaxdiff.models.autoencoder_config import AutoencoderKLConfig
from jaxdiff.models.autoencoder_latents import (
    scale_latents,
    sliced_decode,
    tiled_decode,
    tiled_encode,
    unscale_latents,
    vae_decode_latents,
    vae_encode_latents,
)
from jaxdiff.models.clip_text import (
    CLIPTextModel,
    CLIPTextOutput,
    clip_text_param_shapes,
    init_clip_text,
)
from jaxdiff.models.clip_text_config import CLIPTextConfig
from jaxdiff.models.controlnet import (
    ConditioningEmbedding,
    ControlNet,
    controlnet_dummy_inputs,
    controlnet_param_shapes,
    guess_mode_scales,
    init_controlnet,
    is_zero_conv,
)
from jaxdiff.models.controlnet_config import ControlNetConfig, controlnet_config_from_unet
from jaxdiff.models.controlnet_unet import (
    check_controlnet_matches_unet,
    controlnet_from_unet,
    multi_controlnet_residuals,
)
from jaxdiff.models.embeddings import (
    ClassTokens,
    TimestepEmbedding,
    guidance_scale_embedding,
    timestep_embedding,
)
from jaxdiff.models.host_init import host_init
from jaxdiff.models.resnet import Downsample, ResnetBlock, Upsample, nearest_resize
from jaxdiff.models.unet import (
    UNet,
    init_unet,
    mnist_unet_config,
    unet_dummy_inputs,
    unet_param_shapes,
)
from jaxdiff.models.unet_blocks import DownBlock, MidBlock, UpBlock
from jaxdiff.models.unet_config import UNetConfig

__all__ = [
    "AutoencoderKL",
    "AutoencoderKLConfig",
    "BasicTransformerBlock",
    "CLIPTextConfig",
    "CLIPTextModel",
    "CLIPTextOutput",
    "ClassTokens",
    "ConditioningEmbedding",
    "ControlNet",
    "ControlNetConfig",
    "DiagonalGaussian",
    "DownBlock",
    "Downsample",
    "FeedForward",
    "MidBlock",
    "MultiHeadAttention",
    "ResnetBlock",
    "SpatialSelfAttention",
    "TimestepEmbedding",
    "Transformer2D",
    "UNet",
    "UNetConfig",
    "UpBlock",
    "Upsample",
    "autoencoder_param_shapes",
    "check_controlnet_matches_unet",
    "clip_text_param_shapes",
    "controlnet_config_from_unet",
    "controlnet_dummy_inputs",
    "controlnet_from_unet",
    "controlnet_param_shapes",
    "guess_mode_scales",
    "guidance_scale_embedding",
    "init_autoencoder",
    "host_init",
    "init_clip_text",
    "init_controlnet",
    "init_unet",
    "is_zero_conv",
    "mnist_unet_config",
    "multi_controlnet_residuals",
    "nearest_resize",
    "scale_latents",
    "sliced_decode",
    "tiled_decode",
    "tiled_encode",
    "timestep_embedding",
    "unet_dummy_inputs",
    "unet_param_shapes",
    "unscale_latents",
    "vae_decode_latents",
    "vae_encode_latents",
]
