"""SDXL's prompt encoding (jaxdiff.pipelines.sdxl_text) against diffusers'
``StableDiffusionXLPipeline.encode_prompt`` on a tiny pipeline built in memory, and both SDXL
tokenizers against transformers' ``CLIPTokenizer``.

The torch pipeline: two random transformers encoders (``CLIPTextModel`` and
``CLIPTextModelWithProjection``, biases and LayerNorm affine randomised, ``gelu``, SDXL's
``eos_token_id = 2`` legacy rule, or the first-EOS rule), tokenizers written by
:func:`jaxdiff.pipelines.tiny.write_tiny_tokenizer` (the second pads with ``"!"``, id 0, as
SDXL's ``tokenizer_2``), and a tiny ``UNet2DConditionModel`` with
``addition_embed_type="text_time"`` only because the pipeline needs one (jaxdiff's UNet is not
involved). jaxdiff tokenizes the same strings with its own tokenizers (loaded from the same
folders) and encodes with the weights converted by
:func:`jaxdiff.convert.clip_text_from_transformers`, inside one ``jit``.

Tolerance: each encoder's part of ``prompt_embeds`` (and the pooled embedding) within
``network_rtol`` of that encoder (``tolerances.network_rtol(*torch_layers(encoder))``, relative
to ``max |reference|``): the float32 bound of its layers, which covers the penultimate state (a
prefix of the network) too. Zeros (``force_zeros_for_empty_prompt``) are compared exactly.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
import torch
import transformers
from transformers import CLIPTextConfig as TorchCLIPTextConfig
from transformers import CLIPTextModel as TorchCLIPTextModel
from transformers import CLIPTextModelWithProjection as TorchCLIPTextModelWithProjection
from transformers import CLIPTokenizer as HFCLIPTokenizer

from jaxdiff.convert import clip_text_from_transformers
from jaxdiff.models import CLIPTextConfig
from jaxdiff.pipelines.loading import load_tokenizer
from jaxdiff.pipelines.sdxl_text import (
    SDXLTokens,
    check_sdxl_clip_skip,
    check_sdxl_text_encoders,
    encode_sdxl_prompts,
    tokenize_sdxl_prompts,
)
from jaxdiff.pipelines.tiny import write_tiny_tokenizer
from tests.parity.test_unet_parity import rel_err
from tests.parity.tolerances import network_rtol, torch_layers, within

transformers.logging.set_verbosity_error()

MAX_LEN = 16
PROMPTS = ["a cat", "the dog of the cat, an owl"]
LONG = "a cat and the dog " * 6  # longer than 14 tokens: truncated


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl_tok")
    return (write_tiny_tokenizer(str(root / "tokenizer"), MAX_LEN),
            write_tiny_tokenizer(str(root / "tokenizer_2"), MAX_LEN, pad_token="!"))


def torch_encoder(with_projection: bool, seed: int, eos_token_id: int, vocab: int, **kw):
    """A random transformers CLIP text model (biases and LayerNorm affine randomised too)."""
    torch.manual_seed(seed)
    config = TorchCLIPTextConfig(vocab_size=vocab, max_position_embeddings=MAX_LEN,
                                 hidden_act="gelu", bos_token_id=vocab - 2,
                                 eos_token_id=eos_token_id, pad_token_id=1, **kw)
    cls = TorchCLIPTextModelWithProjection if with_projection else TorchCLIPTextModel
    model = cls(config).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
            elif "layer_norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
    return model


def torch_pipeline(tokenizer_dirs, *, refiner=False, img2img=False, force_zeros=True,
                   eos_token_id=2):
    """A tiny diffusers SDXL pipeline: ``StableDiffusionXLPipeline``;
    ``StableDiffusionXLImg2ImgPipeline`` for ``img2img``; for ``refiner`` the latter without the
    first encoder and with ``requires_aesthetics_score``."""
    import diffusers

    tok1, tok2 = (HFCLIPTokenizer.from_pretrained(d) for d in tokenizer_dirs)
    vocab = len(tok2.get_vocab())
    eos = eos_token_id if eos_token_id == 2 else vocab - 1
    te1 = torch_encoder(False, 0, eos, vocab, hidden_size=32, intermediate_size=40,
                        num_hidden_layers=2, num_attention_heads=4)
    te2 = torch_encoder(True, 1, eos, vocab, hidden_size=48, intermediate_size=56,
                        num_hidden_layers=3, num_attention_heads=4, projection_dim=24)
    cross = 48 if refiner else 80
    n_ids = 5 if refiner else 6
    torch.manual_seed(2)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(8, 16), norm_num_groups=4, attention_head_dim=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=cross,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=4 * n_ids + 24).eval()
    vae = diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4,
                                  down_block_types=("DownEncoderBlock2D",),
                                  up_block_types=("UpDecoderBlock2D",)).eval()
    scheduler = diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear",
                                                 beta_start=0.00085, beta_end=0.012,
                                                 steps_offset=1)
    if refiner or img2img:
        return diffusers.StableDiffusionXLImg2ImgPipeline(
            vae=vae, text_encoder=None if refiner else te1, text_encoder_2=te2,
            tokenizer=None if refiner else tok1, tokenizer_2=tok2, unet=unet,
            scheduler=scheduler, requires_aesthetics_score=refiner,
            force_zeros_for_empty_prompt=force_zeros, add_watermarker=False)
    return diffusers.StableDiffusionXLPipeline(
        vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1, tokenizer_2=tok2,
        unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=force_zeros,
        add_watermarker=False)


def jax_side(pipe, tokenizer_dirs):
    """jaxdiff's tokenizers, configs and params for ``pipe``'s encoders."""
    refiner = pipe.text_encoder is None
    config_2, params_2 = clip_text_from_transformers(pipe.text_encoder_2)
    params = {"text_encoder_2": params_2}
    config = None
    if not refiner:
        config, params["text_encoder"] = clip_text_from_transformers(pipe.text_encoder)
    tok = None if refiner else load_tokenizer(tokenizer_dirs[0])
    tok_2 = load_tokenizer(tokenizer_dirs[1])
    check_sdxl_text_encoders(config, config_2, tok, tok_2)
    return config, config_2, params, tok, tok_2


def check_embeddings(pipe, got, want, what):
    """``got``: jaxdiff's SDXLEmbeddings; ``want``: (prompt_embeds, pooled) torch tensors."""
    embeds, pooled = np.asarray(got.prompt_embeds), np.asarray(got.pooled)
    ref_embeds, ref_pooled = (t.numpy() for t in want)
    assert embeds.shape == ref_embeds.shape and pooled.shape == ref_pooled.shape
    encoders = [e for e in (pipe.text_encoder, pipe.text_encoder_2) if e is not None]
    start = 0
    for i, enc in enumerate(encoders):
        d = enc.config.hidden_size
        part = slice(start, start + d)
        within(rel_err(embeds[..., part], ref_embeds[..., part]),
               network_rtol(*torch_layers(enc)), f"{what} prompt_embeds[encoder {i + 1}]")
        start += d
    within(rel_err(pooled, ref_pooled), network_rtol(*torch_layers(pipe.text_encoder_2)),
           f"{what} pooled")


# name -> (pipeline kwargs, encode kwargs)
CASES = {
    "force_zeros": (dict(), dict(prompt=PROMPTS)),
    "negatives_and_prompt_2_clip_skip": (
        dict(eos_token_id=None),
        dict(prompt=PROMPTS, prompt_2=["an owl", LONG], negative_prompt="the dog",
             negative_prompt_2=["a cat of", "owl"], clip_skip=1)),
    "no_force_zeros_empty_negative": (dict(force_zeros=False), dict(prompt=[LONG, "a dog"])),
    "refiner": (dict(refiner=True), dict(prompt=PROMPTS, negative_prompt=["cat", ""])),
    "refiner_force_zeros": (dict(refiner=True), dict(prompt="the cat", clip_skip=2)),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_encode_prompt_matches_diffusers(name, tokenizer_dirs, caplog):
    pipe_kw, kw = CASES[name]
    pipe = torch_pipeline(tokenizer_dirs, **pipe_kw)
    with torch.no_grad():
        ref = pipe.encode_prompt(device="cpu", num_images_per_prompt=1,
                                 do_classifier_free_guidance=True, **kw)
    config, config_2, params, tok, tok_2 = jax_side(pipe, tokenizer_dirs)
    skip = check_sdxl_clip_skip(config, config_2, kw.get("clip_skip"))
    tokens, negative = tokenize_sdxl_prompts(
        kw["prompt"], kw.get("prompt_2"), kw.get("negative_prompt"), kw.get("negative_prompt_2"),
        tokenizer=tok, tokenizer_2=tok_2,
        force_zeros_for_empty_prompt=pipe.config.force_zeros_for_empty_prompt,
        text_config=config, text_config_2=config_2)
    encode = jax.jit(encode_sdxl_prompts, static_argnums=(0, 1), static_argnames="clip_skip")
    cond, uncond = encode(config, config_2, params, tokens, negative, clip_skip=skip)
    check_embeddings(pipe, cond, (ref[0], ref[2]), "cond")
    if negative is None:  # force_zeros_for_empty_prompt: exact zeros on both sides
        assert not ref[1].any() and not ref[3].any()
        assert not np.asarray(uncond.prompt_embeds).any() and not np.asarray(uncond.pooled).any()
        assert uncond.prompt_embeds.shape == cond.prompt_embeds.shape
    else:
        check_embeddings(pipe, uncond, (ref[1], ref[3]), "uncond")
    texts = [t for v in kw.values() if not isinstance(v, int)
             for t in ([v] if isinstance(v, str) else v)]
    if LONG in texts:  # the truncation warning, from jaxdiff's side too
        assert any("truncated" in r.getMessage() and r.name == "jaxdiff.pipelines.sdxl_text"
                   for r in caplog.records)


@pytest.mark.parametrize("which", [0, 1])
def test_both_tokenizers_give_transformers_ids(tokenizer_dirs, which):
    """``tokenizer`` pads with EOS, ``tokenizer_2`` with ``"!"`` (id 0), as transformers."""
    hf = HFCLIPTokenizer.from_pretrained(tokenizer_dirs[which])
    ours = load_tokenizer(tokenizer_dirs[which])
    texts = [*PROMPTS, LONG, ""]
    want = hf(texts, padding="max_length", max_length=MAX_LEN, truncation=True).input_ids
    got = ours(texts, padding="max_length", truncation=True).input_ids
    np.testing.assert_array_equal(got, np.asarray(want))
    pad = ours.eos_token_id if which == 0 else 0
    assert ours.pad_token_id == hf.pad_token_id == pad
    assert got[0, -1] == pad


def test_tokenizer_2_saved_by_transformers_keeps_its_pad_token(tokenizer_dirs, tmp_path):
    """transformers 5's ``save_pretrained`` writes ``tokenizer.json`` (no vocab.json): jaxdiff's
    ``load_tokenizer`` reads the BPE model from it and the ``"!"`` padding from
    ``tokenizer_config.json``."""
    hf = HFCLIPTokenizer.from_pretrained(tokenizer_dirs[1])
    hf.save_pretrained(tmp_path)
    assert not (tmp_path / "vocab.json").exists() or (tmp_path / "tokenizer.json").exists()
    ours = load_tokenizer(str(tmp_path))
    texts = [*PROMPTS, LONG]
    want = hf(texts, padding="max_length", max_length=MAX_LEN, truncation=True).input_ids
    got = ours(texts, padding="max_length", truncation=True).input_ids
    np.testing.assert_array_equal(got, np.asarray(want))
    assert ours.pad_token == "!" and ours.pad_token_id == 0 and got[0, -1] == 0


def test_bad_inputs_name_the_problem(tokenizer_dirs):
    tok, tok_2 = (load_tokenizer(d) for d in tokenizer_dirs)
    small = dict(vocab_size=tok.vocab_size, hidden_size=8, intermediate_size=8,
                 num_attention_heads=2, max_position_embeddings=MAX_LEN)
    config = CLIPTextConfig(num_hidden_layers=3, **small)
    config_2 = CLIPTextConfig(num_hidden_layers=4, projection_dim=4, **small)
    params = {}  # every error below is raised before the encoders run

    with pytest.raises(ValueError, match="text_encoder_2 is required"):
        check_sdxl_text_encoders(config, None)
    with pytest.raises(ValueError, match="CLIPTextModelWithProjection"):
        check_sdxl_text_encoders(config, dataclasses.replace(config_2, projection_dim=None))
    with pytest.raises(ValueError, match="text_encoder is given without tokenizer"):
        check_sdxl_text_encoders(config, config_2, None, tok_2)
    short = load_tokenizer(tokenizer_dirs[1])
    short.max_length = 12
    with pytest.raises(ValueError, match="tokenizer_2 to 12"):
        check_sdxl_text_encoders(config, config_2, tok, short)
    with pytest.raises(ValueError, match="clip_skip"):
        check_sdxl_clip_skip(config, config_2, 3)  # encoder 1 has 3 layers: k <= 2
    with pytest.raises(ValueError, match="prompt_2 is for a second tokenizer"):
        tokenize_sdxl_prompts("a", "b", tokenizer=None, tokenizer_2=tok_2)
    with pytest.raises(ValueError, match="negative_prompt_2 is given without negative_prompt"):
        tokenize_sdxl_prompts("a", negative_prompt_2="b", tokenizer=tok, tokenizer_2=tok_2)
    with pytest.raises(ValueError, match="negative_prompt has 1 entries, the prompt 2"):
        tokenize_sdxl_prompts(["a", "b"], negative_prompt=["c"], tokenizer=tok,
                              tokenizer_2=tok_2)
    tokens, _ = tokenize_sdxl_prompts("a", tokenizer=tok, tokenizer_2=tok_2)
    with pytest.raises(ValueError, match="input_ids must be None exactly when"):
        encode_sdxl_prompts(None, config_2, params, tokens, None)
    with pytest.raises(ValueError, match="same shape"):
        encode_sdxl_prompts(config, config_2, params,
                            SDXLTokens(tokens.input_ids[:, :8], tokens.input_ids_2), None)
    with pytest.raises(ValueError, match="negative_tokens' shapes"):
        encode_sdxl_prompts(config, config_2, params, tokens,
                            SDXLTokens(tokens.input_ids[:, :8], tokens.input_ids_2[:, :8]))
