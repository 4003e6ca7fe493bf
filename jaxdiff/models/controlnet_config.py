"""The ControlNet's hyper-parameters: :class:`ControlNetConfig`, and
:func:`controlnet_config_from_unet` (diffusers' ``ControlNetModel.from_unet``, the config half).

A ControlNet is a trainable copy of a UNet's encoder (its time / added / class embeddings,
``conv_in``, down blocks and mid block) plus a small conditioning network and zero convolutions;
so its config is the UNet config it copies (:attr:`ControlNetConfig.unet`) and the few fields of
its own.
"""

from __future__ import annotations

import dataclasses

from jaxdiff.models.unet_config import UNetConfig
from jaxdiff.validation import check_bool, check_choice, check_int

__all__ = [
    "CHANNEL_ORDERS",
    "DEFAULT_CONDITIONING_CHANNELS",
    "ControlNetConfig",
    "controlnet_config_from_unet",
]

CHANNEL_ORDERS = ("rgb", "bgr")
# diffusers' conditioning_embedding_out_channels default: 3 stride-2 convolutions, 8x (SD's VAE)
DEFAULT_CONDITIONING_CHANNELS = (16, 32, 96, 256)


@dataclasses.dataclass(frozen=True)
class ControlNetConfig:
    """A ControlNet (see :class:`jaxdiff.models.ControlNet`).

    Attributes:
      unet: the encoder it copies, as a :class:`UNetConfig`: ``in_channels``, ``block_channels``,
        ``layers_per_block``, ``attention``, the mid block, heads, transformer depth,
        ``context_dim``, the norms, the time embedding and ``added_cond`` / ``num_classes`` /
        ``time_cond_dim`` (which inputs the ControlNet takes), dtypes, ``remat``. The up path is
        not part of a ControlNet: ``out_channels`` is normalised to ``in_channels`` and
        ``up_attention`` to ``None``, so that two configs of the same ControlNet compare equal.
      conditioning_channels: channels of the control image (3: RGB).
      conditioning_embedding_channels: the conditioning network's widths (diffusers'
        ``conditioning_embedding_out_channels``): a 3x3 conv to the first, then per next width a
        3x3 conv and a stride-2 3x3 conv, so the control image is :attr:`downscale` =
        ``2 ** (len - 1)`` times the latent grid (8 with the default 4 widths, SD's VAE factor).
      global_pool_conditions: the residuals are averaged over space (``[B, 1, 1, C]``, broadcast
        by the UNet), as diffusers' ``global_pool_conditions`` (ControlNet 1.1 "shuffle").
      conditioning_channel_order: ``"rgb"``, or ``"bgr"`` (the control image's channels are
        reversed first), diffusers' ``controlnet_conditioning_channel_order``.

    Raises:
      ValueError: naming the field: ``unet`` not a :class:`UNetConfig`; a count or width not an
        int >= 1; ``conditioning_embedding_channels`` empty; ``global_pool_conditions`` not a
        bool; an unknown channel order.
    """

    unet: UNetConfig
    conditioning_channels: int = 3
    conditioning_embedding_channels: tuple[int, ...] = DEFAULT_CONDITIONING_CHANNELS
    global_pool_conditions: bool = False
    conditioning_channel_order: str = "rgb"

    def __post_init__(self):
        if not isinstance(self.unet, UNetConfig):
            raise ValueError(f"unet must be a UNetConfig (the encoder the ControlNet copies), got "
                             f"{type(self.unet).__name__}")
        if self.unet.out_channels != self.unet.in_channels or self.unet.up_attention is not None:
            object.__setattr__(self, "unet", dataclasses.replace(
                self.unet, out_channels=self.unet.in_channels, up_attention=None))
        object.__setattr__(self, "conditioning_channels", check_int(
            "conditioning_channels", self.conditioning_channels, minimum=1))
        chans = self.conditioning_embedding_channels
        if isinstance(chans, list):
            chans = tuple(chans)
        if not isinstance(chans, tuple) or not chans:
            raise ValueError(f"conditioning_embedding_channels must be a non-empty tuple of ints, "
                             f"got {self.conditioning_embedding_channels!r}")
        chans = tuple(check_int(f"conditioning_embedding_channels[{i}]", c, minimum=1)
                      for i, c in enumerate(chans))
        object.__setattr__(self, "conditioning_embedding_channels", chans)
        object.__setattr__(self, "global_pool_conditions", check_bool(
            "global_pool_conditions", self.global_pool_conditions))
        check_choice("conditioning_channel_order", self.conditioning_channel_order, CHANNEL_ORDERS)

    @property
    def downscale(self) -> int:
        """How many times larger than the latent grid the control image is (``2 ** (len(
        conditioning_embedding_channels) - 1)``)."""
        return 2 ** (len(self.conditioning_embedding_channels) - 1)

    @property
    def num_down_residuals(self) -> int:
        """The number of down residuals, one per skip connection of the UNet: ``conv_in``'s
        output, each level's layers and each downsample."""
        n = len(self.unet.block_channels)
        return 1 + sum(self.unet.layers(lv) for lv in range(n)) + n - 1


def controlnet_config_from_unet(
    unet: UNetConfig,
    *,
    conditioning_channels: int = 3,
    conditioning_embedding_channels: tuple[int, ...] = DEFAULT_CONDITIONING_CHANNELS,
    global_pool_conditions: bool = False,
    conditioning_channel_order: str = "rgb",
) -> ControlNetConfig:
    """The config of a ControlNet for ``unet`` (the config half of diffusers'
    ``ControlNetModel.from_unet``).

    The encoder is the UNet's, with what diffusers' ``from_unet`` does not copy reset: no
    guidance-scale embedding (``time_cond_dim=None``: an LCM UNet's ControlNet takes no
    ``timestep_cond``) and no input centring. The other arguments are
    :class:`ControlNetConfig`'s fields. :func:`jaxdiff.models.controlnet_from_unet` also copies
    the weights.

    Raises:
      ValueError: ``unet`` is not a :class:`UNetConfig`; as :class:`ControlNetConfig`.
    """
    if not isinstance(unet, UNetConfig):
        raise ValueError(f"unet must be a UNetConfig, got {type(unet).__name__}")
    encoder = dataclasses.replace(unet, time_cond_dim=None, center_input_sample=False)
    return ControlNetConfig(
        encoder, conditioning_channels=conditioning_channels,
        conditioning_embedding_channels=tuple(conditioning_embedding_channels),
        global_pool_conditions=global_pool_conditions,
        conditioning_channel_order=conditioning_channel_order,
    )  # fmt: skip
