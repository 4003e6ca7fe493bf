"""A tiny random Stable Diffusion folder, written by diffusers itself, with no download.

For tests, benchmarks and examples: the same layout and classes as a real checkpoint
(``StableDiffusionPipeline.save_pretrained``), random weights, small widths. Needs ``torch``,
``diffusers`` and ``transformers`` (imported here only).

    pipe = write_tiny_stable_diffusion("/tmp/tiny-sd")      # the diffusers pipeline, float32
    sd = load_stable_diffusion("/tmp/tiny-sd")
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Sequence

__all__ = ["TINY_VOCAB_MERGES", "write_tiny_controlnet", "write_tiny_tokenizer",
           "write_tiny_stable_diffusion",
           "write_tiny_stable_diffusion_xl"]

# A few BPE merges over the byte alphabet (so that common words are single tokens).
TINY_VOCAB_MERGES = (("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>"), ("a", "n"),
                     ("o", "f</w>"), ("t", "h"), ("th", "e</w>"))


def _byte_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes (CLIP's ``bytes_to_unicode``), in order."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
          *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tiny_tokenizer(path: str, max_length: int = 16, pad_token: str = "<|endoftext|>") -> str:
    """A CLIP-layout tokenizer folder (bytes, bytes + ``</w>``, :data:`TINY_VOCAB_MERGES`, BOS,
    EOS; ``model_max_length = max_length``), padding with ``pad_token`` (SDXL's ``tokenizer_2``:
    ``"!"``, id 0). Returns ``path``."""
    chars = _byte_alphabet()
    tokens = [*chars, *(c + "</w>" for c in chars), *("".join(m) for m in TINY_VOCAB_MERGES),
              "<|startoftext|>", "<|endoftext|>"]
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(tokens)}, f, ensure_ascii=False)
    with open(os.path.join(path, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(["#version: 0.2", *(" ".join(m) for m in TINY_VOCAB_MERGES)]) + "\n")
    config = {"model_max_length": max_length, "bos_token": "<|startoftext|>",
              "eos_token": "<|endoftext|>", "pad_token": pad_token,
              "unk_token": "<|endoftext|>", "do_lower_case": True,
              "tokenizer_class": "CLIPTokenizer"}
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f)
    return path


def write_tiny_stable_diffusion(
    path: str,
    *,
    scheduler: str = "DDIMScheduler",
    prediction_type: str = "epsilon",
    sd2: bool = False,
    unet_channels: Sequence[int] = (16, 32),
    vae_channels: Sequence[int] = (8, 16),
    text_width: int = 32,
    text_layers: int = 2,
    max_length: int = 16,
    image_size: int = 32,
    seed: int = 0,
    variant: str | None = None,
    scheduler_options: dict[str, Any] | None = None,
    unet_options: dict[str, Any] | None = None,
):
    """Build a random tiny ``StableDiffusionPipeline`` (float32) and ``save_pretrained`` it.

    Args:
      path: the folder to write.
      scheduler: a diffusers scheduler class name; SD's betas (scaled_linear 0.00085 - 0.012)
        and, for DDIM, SD's ``steps_offset=1, set_alpha_to_one=False, clip_sample=False``.
      prediction_type: ``"epsilon"`` or ``"v_prediction"``.
      sd2: SD 2.x's architecture choices (linear projections in the transformers, per-level
        head counts, ``gelu`` text encoder, ``upcast_attention``) instead of SD 1.x's.
      unet_channels, vae_channels: the widths per level (two or more levels).
      text_width, text_layers, max_length: the CLIP text encoder's width, depth and context.
      image_size: the default image side (the UNet's sample size times the VAE factor).
      seed: ``torch.manual_seed`` for the weights.
      variant: save ``*.<variant>.*`` weight files (e.g. ``"fp16"``; the tensors stay float32).
      scheduler_options: more scheduler config entries.
      unet_options: more (or other) ``UNet2DConditionModel`` arguments (e.g. ``in_channels=9``
        for an inpainting UNet, ``time_cond_proj_dim`` for
        an LCM-distilled UNet's guidance embedding).

    Returns:
      The diffusers pipeline (with ``safety_checker=None``), for comparisons.
    """
    import diffusers
    import torch
    import transformers

    torch.manual_seed(seed)
    levels = len(unet_channels)
    down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1)
    up = ("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",)
    heads = tuple(max(1, c // 8) for c in unet_channels) if sd2 else 2
    vae_factor = 2 ** (len(vae_channels) - 1)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=tuple(unet_channels), layers_per_block=1,
        sample_size=image_size // vae_factor,
        down_block_types=down, up_block_types=up, cross_attention_dim=text_width,
        attention_head_dim=heads, norm_num_groups=8, use_linear_projection=sd2,
        upcast_attention=sd2, **{"in_channels": 4, "out_channels": 4, **(unet_options or {})},
    )
    vae = diffusers.AutoencoderKL(
        block_out_channels=tuple(vae_channels), in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(vae_channels), latent_channels=4,
        norm_num_groups=8, sample_size=image_size,
    )
    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = write_tiny_tokenizer(tmp, max_length)
        tokenizer = transformers.CLIPTokenizer.from_pretrained(tok_dir,
                                                               model_max_length=max_length)
    vocab = tokenizer.get_vocab()
    eos = vocab["<|endoftext|>"]
    text_config = transformers.CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=text_width, intermediate_size=2 * text_width,
        num_hidden_layers=text_layers, num_attention_heads=4, max_position_embeddings=max_length,
        bos_token_id=vocab["<|startoftext|>"], eos_token_id=eos, pad_token_id=eos,
        hidden_act="gelu" if sd2 else "quick_gelu", layer_norm_eps=1e-5,
    )
    text_encoder = transformers.CLIPTextModel(text_config)
    base = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                prediction_type=prediction_type, num_train_timesteps=1000)
    if scheduler == "DDIMScheduler":
        base.update(steps_offset=1, set_alpha_to_one=False, clip_sample=False)
    base.update(scheduler_options or {})
    sched = getattr(diffusers, scheduler)(**base)
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=sched,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(path, variant=variant)
    return pipe


def write_tiny_stable_diffusion_xl(
    path: str,
    *,
    refiner: bool = False,
    img2img: bool = False,
    force_zeros_for_empty_prompt: bool | None = None,
    unet_channels: Sequence[int] = (32, 64),
    vae_channels: Sequence[int] = (8, 16),
    text_widths: tuple[int, int] = (32, 32),
    projection_dim: int = 16,
    max_length: int = 16,
    image_size: int = 32,
    seed: int = 0,
    scheduler_options: dict[str, Any] | None = None,
    unet_options: dict[str, Any] | None = None,
    scheduler: str = "EulerDiscreteScheduler",
):
    """Build a random tiny SDXL pipeline (float32) and ``save_pretrained`` it: SDXL's layout
    (``text_encoder`` CLIPTextModel + ``text_encoder_2`` CLIPTextModelWithProjection, ``gelu``,
    ``eos_token_id=2``; ``tokenizer_2`` padding with ``"!"``; a ``text_time`` UNet without
    attention in its first level and 1, 2 transformer layers per level; the VAE's scaling 0.13025;
    SDXL base's ``EulerDiscreteScheduler`` config).

    Args:
      path: the folder to write.
      refiner: a refiner (``StableDiffusionXLImg2ImgPipeline`` without ``text_encoder`` /
        ``tokenizer``, ``requires_aesthetics_score``, 5 time ids, cross-attention of
        ``text_encoder_2``'s width).
      img2img: a ``StableDiffusionXLImg2ImgPipeline`` with both encoders (no aesthetics).
      force_zeros_for_empty_prompt: the pipeline flag; default True, False for a refiner (as the
        published folders).
      unet_channels, vae_channels: the widths per level.
      text_widths: the two encoders' hidden sizes; ``projection_dim`` the pooled width.
      max_length, image_size, seed, scheduler_options, unet_options: as
        :func:`write_tiny_stable_diffusion` (``unet_options={"time_cond_proj_dim": 16}``: an
        LCM-SDXL UNet).
      scheduler: the diffusers scheduler class, built from SDXL base's config.

    Returns:
      The diffusers pipeline, for comparisons.
    """
    import diffusers
    import torch
    import transformers

    torch.manual_seed(seed)
    force = (not refiner) if force_zeros_for_empty_prompt is None else force_zeros_for_empty_prompt
    n_ids = 5 if refiner else 6
    time_dim = 8
    cross = text_widths[1] + (0 if refiner else text_widths[0])
    vae_factor = 2 ** (len(vae_channels) - 1)
    levels = len(unet_channels)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=tuple(unet_channels), layers_per_block=1,
        sample_size=image_size // vae_factor,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
        cross_attention_dim=cross, attention_head_dim=tuple(max(1, c // 16)
                                                            for c in unet_channels),
        transformer_layers_per_block=tuple(min(i + 1, 2) for i in range(levels)),
        norm_num_groups=8, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=time_dim * n_ids + projection_dim,
        **{"in_channels": 4, "out_channels": 4, **(unet_options or {})},
    )
    vae = diffusers.AutoencoderKL(
        block_out_channels=tuple(vae_channels), in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(vae_channels), latent_channels=4,
        norm_num_groups=8, sample_size=image_size, scaling_factor=0.13025,
    )
    with tempfile.TemporaryDirectory() as tmp:
        tok_1 = transformers.CLIPTokenizer.from_pretrained(
            write_tiny_tokenizer(os.path.join(tmp, "t1"), max_length),
            model_max_length=max_length)
        tok_2 = transformers.CLIPTokenizer.from_pretrained(
            write_tiny_tokenizer(os.path.join(tmp, "t2"), max_length, pad_token="!"),
            model_max_length=max_length)
    vocab = tok_2.get_vocab()

    def encoder(width: int, projection: bool):
        config = transformers.CLIPTextConfig(
            vocab_size=len(vocab), hidden_size=width, intermediate_size=2 * width,
            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=max_length,
            bos_token_id=vocab["<|startoftext|>"], eos_token_id=2, pad_token_id=1,
            hidden_act="gelu", layer_norm_eps=1e-5,
            projection_dim=projection_dim if projection else 512)
        cls = (transformers.CLIPTextModelWithProjection if projection
               else transformers.CLIPTextModel)
        return cls(config)

    text_encoder = None if refiner else encoder(text_widths[0], False)
    text_encoder_2 = encoder(text_widths[1], True)
    config = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                  num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading",
                  interpolation_type="linear", prediction_type="epsilon")
    config.update(scheduler_options or {})
    parts = dict(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                 tokenizer=None if refiner else tok_1, tokenizer_2=tok_2, unet=unet,
                 scheduler=getattr(diffusers, scheduler).from_config(config),
                 force_zeros_for_empty_prompt=force, add_watermarker=False)
    if refiner or img2img:
        pipe = diffusers.StableDiffusionXLImg2ImgPipeline(**parts,
                                                          requires_aesthetics_score=refiner)
    else:
        pipe = diffusers.StableDiffusionXLPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(path)
    return pipe


def write_tiny_controlnet(path: str, sd_path: str, *, seed: int = 0, steer: bool = True) -> Any:
    """A tiny random ``ControlNetModel`` for the Stable Diffusion folder ``sd_path`` (SD or
    SDXL), ``save_pretrained`` into ``path``; returns the diffusers model (float32).

    Built as diffusers' ``ControlNetModel.from_unet(unet)`` (the encoder copied from the
    folder's UNet), with a conditioning network that takes control images of the folder's image
    size to its latent grid (``vae_scale_factor`` = 2 ** (stride-2 convs)). diffusers initialises
    the zero convolutions (and the conditioning network's last conv) to zero, so a new
    ControlNet does nothing; ``steer=True`` draws them from ``N(0, 0.1^2)`` (``seed``) so that
    the ControlNet changes the images, as a trained one does.
    """
    import diffusers
    import torch

    with open(os.path.join(sd_path, "vae", "config.json")) as f:
        levels = len(json.load(f)["block_out_channels"])
    unet = diffusers.UNet2DConditionModel.from_pretrained(os.path.join(sd_path, "unet"))
    torch.manual_seed(seed)
    widths = tuple(8 * 2 ** i for i in range(levels))  # levels - 1 stride-2 convs
    net = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=widths)
    if steer:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in net.named_parameters():
                if name.startswith(("controlnet_down_blocks", "controlnet_mid_block",
                                    "controlnet_cond_embedding.conv_out")):
                    p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    net.eval().save_pretrained(path)
    return net
