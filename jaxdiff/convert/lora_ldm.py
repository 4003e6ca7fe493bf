"""The original LDM / SGM UNet's module names, against diffusers' ``UNet2DConditionModel``'s.

CompVis' ``ldm/modules/diffusionmodules/openaimodel.py`` (SD 1.x / 2.x) and Stability's ``sgm``
(SDXL) number the UNet's blocks in three flat lists; kohya sd-scripts' SDXL trainer (and some
A1111 LoRAs for SD 1.x) name LoRA layers by them::

    lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q   (= down_blocks.1.attentions.0...)
    lora_unet_middle_block_1_proj_in                              (= mid_block.attentions.0.proj_in)
    lora_unet_output_blocks_2_2_conv                              (= up_blocks.0.upsamplers.0.conv)

The numbering, for a UNet of ``L`` levels with ``n_l`` resnets in down level ``l``:

- ``input_blocks.0.0`` is ``conv_in``; then, level by level, one input block per resnet
  (``.0`` the resnet, ``.1`` the level's attention when it has one), and one more holding the
  downsampler ``.0.op`` after every level but the last;
- ``middle_block.0`` the first resnet, then attention and resnet in turn;
- ``output_blocks``: the up levels from the lowest resolution, ``n_l + 1`` blocks each (``.0``
  the resnet, ``.1`` the attention when the level has one), the level's last block holding the
  upsampler ``.conv`` after them (``.1`` or ``.2``, there is none at full resolution);
- ``time_embed.0`` / ``.2``, ``label_emb.0.0`` / ``.2`` (SDXL's added conditioning) and
  ``out.2`` (``conv_out``).

So the index of a block depends on ``layers_per_block`` and on which levels attend: the map is
derived from the model's :class:`~jaxdiff.models.UNetConfig` (:func:`ldm_unet_blocks`), never
tabulated for one checkpoint. Inside a resnet, LDM's ``in_layers.2`` / ``out_layers.3`` /
``emb_layers.1`` / ``skip_connection`` are diffusers' ``conv1`` / ``conv2`` / ``time_emb_proj`` /
``conv_shortcut``; the transformers' inner names (``proj_in``, ``transformer_blocks.0.attn1.to_q``,
``ff.net.2``, ...) are the same on both sides.
"""

from __future__ import annotations

from typing import Iterable

from jaxdiff.models.unet_config import UNetConfig

__all__ = ["LDM_RESNET_NAMES", "ldm_unet_blocks", "ldm_module_name", "ldm_unet_names"]

LDM_RESNET_NAMES = {"conv1": "in_layers.2", "conv2": "out_layers.3",
                    "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
"""diffusers' resnet layer names -> LDM's ``ResBlock`` ones (the layers a LoRA can adapt)."""

_TOP = {"conv_in": "input_blocks.0.0", "conv_out": "out.2",
        "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}


def ldm_unet_blocks(config: UNetConfig) -> dict[str, str]:
    """``{LDM module prefix: diffusers module prefix}`` for every block of a UNet of ``config``.

    For example SDXL base (3 levels, 2 resnets each, no attention in the first) has
    ``"input_blocks.4.1" -> "down_blocks.1.attentions.0"``, ``"input_blocks.3.0.op" ->
    "down_blocks.0.downsamplers.0.conv"``, ``"output_blocks.2.2.conv" ->
    "up_blocks.0.upsamplers.0.conv"``; SD 1.5 (4 levels, attention in the first three)
    ``"output_blocks.2.1.conv" -> "up_blocks.0.upsamplers.0.conv"``. Resnets map to
    ``down_blocks.l.resnets.j`` (their inner layers by :data:`LDM_RESNET_NAMES`), attentions to
    ``...attentions.j``; plus the top-level layers (``conv_in``, ``time_embedding.linear_1``,
    ``add_embedding.linear_1``, ``conv_out``, ...).
    """
    out = {ldm: diffusers for diffusers, ldm in _TOP.items()}
    n = len(config.block_channels)
    i = 1
    for level in range(n):
        for j in range(config.layers(level)):
            out[f"input_blocks.{i}.0"] = f"down_blocks.{level}.resnets.{j}"
            if config.attention[level]:
                out[f"input_blocks.{i}.1"] = f"down_blocks.{level}.attentions.{j}"
            i += 1
        if level < n - 1:
            out[f"input_blocks.{i}.0.op"] = f"down_blocks.{level}.downsamplers.0.conv"
            i += 1
    if config.mid_block:
        out["middle_block.0"] = "mid_block.resnets.0"
        k = 1
        for p in range(config.mid_layers):
            if config.mid_attention:
                out[f"middle_block.{k}"] = f"mid_block.attentions.{p}"
                k += 1
            out[f"middle_block.{k}"] = f"mid_block.resnets.{p + 1}"
            k += 1
    i = 0
    for u, level in enumerate(reversed(range(n))):
        last = config.layers(level)
        for j in range(last + 1):
            out[f"output_blocks.{i}.0"] = f"up_blocks.{u}.resnets.{j}"
            inner = 1
            if config.up_kinds[level]:
                out[f"output_blocks.{i}.1"] = f"up_blocks.{u}.attentions.{j}"
                inner = 2
            if level > 0 and j == last:
                out[f"output_blocks.{i}.{inner}.conv"] = f"up_blocks.{u}.upsamplers.0.conv"
            i += 1
    return out


def ldm_module_name(name: str, blocks: dict[str, str]) -> str | None:
    """The LDM name of the diffusers UNet module ``name`` (``"down_blocks.1.attentions.0.
    transformer_blocks.0.attn1.to_q"`` -> ``"input_blocks.4.1.transformer_blocks.0.attn1.to_q"``
    for SDXL), or ``None`` when LDM has no such layer (a resnet's norms, a layer of a block
    ``blocks`` lacks).

    Args:
      name: a diffusers ``UNet2DConditionModel`` module name, without ``unet.``.
      blocks: :func:`ldm_unet_blocks` of the model's config.
    """
    inverse = {d: ldm for ldm, d in blocks.items()}
    if name in inverse:
        return inverse[name]
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        prefix, rest = ".".join(parts[:cut]), ".".join(parts[cut:])
        if prefix not in inverse:
            continue
        if ".resnets." in prefix:
            rest = LDM_RESNET_NAMES.get(rest)
            if rest is None:
                return None
        elif ".attentions." not in prefix:
            return None  # a leaf block (conv_in, a sampler's conv) has no inner layers
        return f"{inverse[prefix]}.{rest}"
    return None


def ldm_unet_names(config: UNetConfig, modules: Iterable[str]) -> dict[str, str]:
    """``{LDM module name: diffusers module name}`` for those of the diffusers UNet module names
    ``modules`` (without ``unet.``) that LDM names (:func:`ldm_module_name`)."""
    blocks = ldm_unet_blocks(config)
    out = {}
    for name in modules:
        ldm = ldm_module_name(name, blocks)
        if ldm is not None:
            out[ldm] = name
    return out
