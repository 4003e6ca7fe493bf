"""The converted CLIP text encoder against transformers' ``CLIPTextModel`` /
``CLIPTextModelWithProjection`` (PyTorch), float32.

Random models: transformers' own initialisation (normal weights of realistic scale), then every
bias drawn at random and every LayerNorm scale around 1 (the init leaves them 0 and 1). Random
ids with BOS / EOS placed as a tokenizer does. Compared: ``last_hidden_state``, every entry of
``hidden_states`` (``output_hidden_states=True``), ``pooler_output``, ``text_embeds``; both EOS
rules (``eos_token_id == 2``: argmax of the ids; otherwise the first EOS, with EOS also used as
padding), both activations (quick_gelu, gelu), right-padded batches with an attention mask, a
left-padded one (compared where the mask is 1), tiny configs and one at SD 1.x's width (768
hidden, 12 layers, 12 heads, 77 positions, a 1000-token vocabulary). Also: weights read back from
a ``text_encoder/`` folder in both key layouts (SD's ``text_model.`` prefix with the old
``position_ids`` buffer, and transformers 5 ``save_pretrained``'s, which has no prefix).

Tolerance: ``max|jax - torch| / max|torch|`` within the network's float32 bound
(``tolerances.network_rtol`` from the model's layer count and widest sum), for every output.
Left-padded positions that see no unmasked key are not compared: there the two softmaxes over
fully masked rows differ (by design, see :class:`jaxdiff.models.CLIPTextModel`).
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import torch
import transformers
from transformers import CLIPTextConfig as TorchCLIPTextConfig
from transformers import CLIPTextModel as TorchCLIPTextModel
from transformers import CLIPTextModelWithProjection as TorchCLIPTextModelWithProjection

from jaxdiff.convert import clip_text_from_transformers, load_clip_text_encoder
from jaxdiff.models import CLIPTextModel
from tests.parity.test_unet_parity import rel_err
from tests.parity.tolerances import network_rtol, torch_layers, within

transformers.logging.set_verbosity_error()  # token ids outside a tiny vocabulary: a warning

TINY = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=3,
            num_attention_heads=4, max_position_embeddings=20, projection_dim=16)  # fmt: skip
BOS, EOS = 97, 98  # the two largest ids, as in CLIP's vocabulary


def torch_clip(with_projection=False, seed=0, **kw) -> torch.nn.Module:
    """A random transformers CLIP text model (biases and LayerNorm affine randomised too)."""
    torch.manual_seed(seed)
    config = TorchCLIPTextConfig(**{**TINY, "bos_token_id": BOS, "pad_token_id": 1, **kw})
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


def prompt_ids(lengths, seq_len, *, eos, pad, vocab, seed=0, left=False):
    """``[B, seq_len]`` ids: BOS, ``n`` random tokens, EOS, then padding; and the mask."""
    rng = np.random.default_rng(seed)
    ids = np.full((len(lengths), seq_len), pad, np.int64)
    mask = np.zeros((len(lengths), seq_len), np.int64)
    for b, n in enumerate(lengths):
        row = [BOS, *rng.integers(2, min(BOS, vocab - 3), n), eos]
        start = seq_len - len(row) if left else 0
        ids[b, start : start + len(row)] = row
        mask[b, start : start + len(row)] = 1
    return ids, mask


def run_both(model, ids, mask=None):
    """(torch outputs, jaxdiff outputs) for the same ids and mask."""
    with torch.no_grad():
        ref = model(
            torch.from_numpy(ids),
            attention_mask=None if mask is None else torch.from_numpy(mask),
            output_hidden_states=True,
        )
    config, params = clip_text_from_transformers(model)
    out = jax.jit(CLIPTextModel(config).apply)({"params": params}, ids, mask)
    return ref, out


def check(ref, out, model, *, where=None):
    """Every output of ``model`` within its float32 bound (only at ``where`` [B, L] positions
    when given); returns the relative errors."""
    sel = (lambda a: np.asarray(a)[where]) if where is not None else np.asarray  # noqa: E731
    errs = {"last_hidden_state": rel_err(sel(out.last_hidden_state),
                                         sel(ref.last_hidden_state.numpy()))}  # fmt: skip
    assert len(out.hidden_states) == len(ref.hidden_states)
    for i, (a, b) in enumerate(zip(out.hidden_states, ref.hidden_states)):
        errs[f"hidden_states[{i}]"] = rel_err(sel(a), sel(b.numpy()))
    if hasattr(ref, "text_embeds"):
        errs["text_embeds"] = rel_err(np.asarray(out.text_embeds), ref.text_embeds.numpy())
    else:
        assert out.text_embeds is None
        errs["pooler_output"] = rel_err(np.asarray(out.pooler_output), ref.pooler_output.numpy())
    bound = network_rtol(*torch_layers(model))
    for name, err in errs.items():
        within(err, bound, name)
    return errs


# name -> (torch config overrides, with_projection, lengths, attention mask)
CASES = {
    "sd1_quick_gelu_legacy_eos": (dict(hidden_act="quick_gelu", eos_token_id=2), False,
                                  [3, 10, 0], False),
    "gelu_first_eos_masked": (dict(hidden_act="gelu", eos_token_id=EOS), False, [5, 1, 12], True),
    "projection_quick_gelu_first_eos": (dict(eos_token_id=EOS), True, [4, 16], True),
    "projection_gelu_legacy_eos": (dict(hidden_act="gelu", eos_token_id=2), True, [7, 2], False),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_tiny_configs_match_transformers(name):
    kw, with_projection, lengths, masked = CASES[name]
    model = torch_clip(with_projection, **kw)
    # legacy configs pad with EOS (SD 1.x); the first-EOS rule must skip padding EOSs too
    ids, mask = prompt_ids(lengths, 18, eos=EOS, pad=EOS, vocab=TINY["vocab_size"])
    ref, out = run_both(model, ids, mask if masked else None)
    check(ref, out, model)


def test_pooled_position_differs_between_rules():
    """The two EOS rules really pool different positions when a larger id precedes EOS."""
    ids, _ = prompt_ids([4], 10, eos=1, pad=0, vocab=TINY["vocab_size"])  # BOS 97 > EOS 1
    for eos_token_id, position in ((2, 0), (1, 5)):
        model = torch_clip(eos_token_id=eos_token_id)
        ref, out = run_both(model, ids)
        check(ref, out, model)
        np.testing.assert_array_equal(
            np.asarray(out.pooler_output), np.asarray(out.last_hidden_state)[:, position]
        )


def test_left_padding_with_mask_matches_where_unmasked():
    model = torch_clip(eos_token_id=EOS, hidden_act="gelu")
    ids, mask = prompt_ids([2, 9, 14], 16, eos=EOS, pad=0, vocab=TINY["vocab_size"], left=True)
    ref, out = run_both(model, ids, mask)
    check(ref, out, model, where=mask.astype(bool))


@pytest.mark.slow
def test_sd1_width_matches_transformers():
    """SD 1.x's text encoder shape (vocabulary cut to 1000) on a full 77-token batch."""
    sd1 = dict(vocab_size=1000, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
               num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
               eos_token_id=2)  # fmt: skip
    model = torch_clip(**sd1)
    rng = np.random.default_rng(3)
    ids = np.full((2, 77), 999, np.int64)  # SD 1.x pads with EOS, the largest id
    ids[:, 0] = 998
    ids[0, 1:9] = rng.integers(1, 990, 8)
    ids[1, 1:76] = rng.integers(1, 990, 75)
    ref, out = run_both(model, ids)
    check(ref, out, model)


@pytest.mark.parametrize("layout", ["sd_prefixed", "save_pretrained"])
def test_text_encoder_folder_round_trip(tmp_path, layout):
    import safetensors.torch

    model = torch_clip(layout == "sd_prefixed", eos_token_id=EOS)
    if layout == "save_pretrained":
        model.save_pretrained(tmp_path)
    else:  # an SD text_encoder_2/ folder: prefixed keys, the old position_ids buffer
        sd = {k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}": v
              for k, v in model.state_dict().items()}  # fmt: skip
        sd["text_model.embeddings.position_ids"] = torch.arange(TINY["max_position_embeddings"])[
            None
        ]
        safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()},
                                    str(tmp_path / "model.safetensors"))  # fmt: skip
        (tmp_path / "config.json").write_text(json.dumps(model.config.to_dict()))
    config, params = load_clip_text_encoder(tmp_path)
    assert (config.projection_dim is not None) == (layout == "sd_prefixed")
    ids, mask = prompt_ids([3, 6], 12, eos=EOS, pad=EOS, vocab=TINY["vocab_size"])
    with torch.no_grad():
        ref = model(torch.from_numpy(ids), output_hidden_states=True)
    out = jax.jit(CLIPTextModel(config).apply)({"params": params}, ids)
    check(ref, out, model)
