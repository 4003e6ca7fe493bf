"""Flax linen modules: embeddings, resnet blocks, attention, and the UNet."""

from jaxdiff.models.attention import (
    BasicTransformerBlock,
    FeedForward,
    MultiHeadAttention,
    SpatialSelfAttention,
    Transformer2D,
)
from jaxdiff.models.embeddings import ClassTokens, TimestepEmbedding, timestep_embedding
from jaxdiff.models.resnet import Downsample, ResnetBlock, Upsample, nearest_resize
from jaxdiff.models.unet import (
    DownBlock,
    MidBlock,
    UNet,
    UpBlock,
    init_unet,
    mnist_unet_config,
    unet_dummy_inputs,
    unet_param_shapes,
)
from jaxdiff.models.unet_config import UNetConfig

__all__ = [
    "BasicTransformerBlock",
    "ClassTokens",
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
    "init_unet",
    "mnist_unet_config",
    "nearest_resize",
    "timestep_embedding",
    "unet_dummy_inputs",
    "unet_param_shapes",
]
