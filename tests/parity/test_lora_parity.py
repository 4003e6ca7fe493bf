"""LoRAs in jaxdiff's Stable Diffusion pipeline against diffusers' ``load_lora_weights`` (peft
backend) on the same tiny random checkpoint folder, float32, 32x32 images, DDIM 3 steps,
guidance 7.5, the same initial latents.

The LoRA files are written by the tests from random weights in each format's own key layout,
with module names taken from the torch models (not from jaxdiff's converters), ``alpha != rank``,
on the UNet (attention, feed-forward, the 1x1 conv ``proj_in``, a 3x3 resnet conv) and the text
encoder (attention, ``mlp.fc1``):

- diffusers / peft: ``unet.<module>.lora_A.weight`` / ``lora_B``, text encoder keys without
  ``text_model.`` (transformers 5's module names), alpha in the ``lora_adapter_metadata``;
- kohya / A1111: ``lora_unet_<module with _>.lora_down.weight`` / ``lora_up`` / ``.alpha``,
  ``lora_te_text_model_...``; and the same on the original LDM UNet's names
  (``lora_unet_input_blocks_3_1_...``, as some A1111 LoRAs for SD 1.x name them; the names from
  tests/parity/test_sdxl_lora_parity.py's hand-written table of the tiny UNet), with the
  resnets' convs and time projection and the down- and upsampler convs adapted too;
- and jaxdiff's own ``save_lora`` of an adapter, read by diffusers.

jaxdiff runs them unfused (scale traced) and fused; diffusers applies a scale through
``cross_attention_kwargs={"scale": s}`` (UNet and text encoder). Tolerances as
tests/parity/test_sd_pipeline_parity.py (tests/parity/tolerances.py: ``pipeline_rtol`` with the
LoRA layers counted in the networks' depth, ``image_atol``); each test also checks that the LoRA
changes the image by far more than that bound, so that a LoRA ignored on both sides cannot pass.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("peft")

import jax  # noqa: E402
import safetensors.torch  # noqa: E402

from jaxdiff.convert import save_lora  # noqa: E402
from jaxdiff.lora import TEXT_ATTENTION, UNET_ATTENTION, UNET_FEED_FORWARD, init_lora  # noqa: E402
from jaxdiff.pipelines import fuse_lora, generate, load_lora, load_stable_diffusion  # noqa: E402
from jaxdiff.pipelines.tiny import write_tiny_stable_diffusion  # noqa: E402
from tests.parity.test_sd_pipeline_parity import (  # noqa: E402
    NEGATIVES,
    PROMPTS,
    _check_against_pipeline,
    _latents,
    _nchw,
)
from tests.parity.test_sdxl_lora_parity import (  # noqa: E402
    UNET_TARGETS as LDM_TEST_TARGETS,
    random_torch_lora,
    tiny_ldm_name,
    write_kohya,
)

pytestmark = pytest.mark.slow  # every test here takes > 1.5 s on 2 cores

RANK, ALPHA, STEPS, W = 4, 3.0, 3, 7.5
UNET_TARGETS = re.compile(r"(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.0\.proj|ff\.net\.2|"
                          r"proj_in|mid_block\.resnets\.0\.conv1)$")
TEXT_TARGETS = re.compile(r"(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.fc1)$")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("sd1_lora"))
    write_tiny_stable_diffusion(path, seed=0)
    return path


@pytest.fixture(scope="module")
def sd(folder):
    return load_stable_diffusion(folder)


def _pipe(folder):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _random_torch_lora(pipe, seed=0):
    """``{(part, module name): (A [r, in(, kh, kw)], B [out, r(, 1, 1)])}`` on the target
    modules of the torch models; ``B`` large enough to change the image visibly."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for part, model, rx in (("unet", pipe.unet, UNET_TARGETS),
                            ("text_encoder", pipe.text_encoder, TEXT_TARGETS)):
        for name, module in model.named_modules():
            if not rx.search(name):
                continue
            w = module.weight
            fan_in = int(np.prod(w.shape[1:]))
            a = (torch.rand((RANK, *w.shape[1:]), generator=g) * 2 - 1) / fan_in ** 0.5
            b = torch.randn((w.shape[0], RANK) + (1, 1) * (w.ndim == 4), generator=g) * 0.15
            out[(part, name)] = (a.contiguous(), b.contiguous())
    # 4 transformers of 8 attention + 2 feed-forward layers, 4 proj_in, 1 resnet conv
    assert sum(p == "unet" for p, _ in out) == 4 * 10 + 4 + 1
    return out


def _write_peft(pairs, path):
    state, targets = {}, {"unet": [], "text_encoder": []}
    for (part, name), (a, b) in pairs.items():
        state[f"{part}.{name}.lora_A.weight"] = a
        state[f"{part}.{name}.lora_B.weight"] = b
        targets[part].append(name)
    meta = {}
    for part, names in targets.items():
        meta.update({f"{part}.r": RANK, f"{part}.lora_alpha": ALPHA,
                     f"{part}.target_modules": sorted(names)})
    safetensors.torch.save_file(state, path, metadata={
        "format": "pt", "lora_adapter_metadata": json.dumps(meta)})
    return path


def _write_kohya(pairs, path):
    state = {}
    for (part, name), (a, b) in pairs.items():
        if part == "unet":
            key = "lora_unet_" + name.replace(".", "_")
        else:  # kohya names the text encoder's modules with the text_model. prefix
            key = "lora_te_" + ("" if name.startswith("text_model.") else "text_model_") + \
                name.replace(".", "_")
        state[f"{key}.lora_down.weight"] = a
        state[f"{key}.lora_up.weight"] = b
        state[f"{key}.alpha"] = torch.tensor(ALPHA)
    safetensors.torch.save_file(state, path)
    return path


def _diffusers(folder, file, scale, ldm=False):
    pipe = _pipe(folder)
    # StableDiffusionPipeline maps LDM UNet names only when given the UNet's config (the SDXL
    # pipeline passes its own)
    pipe.load_lora_weights(file, **({"unet_config": pipe.unet.config} if ldm else {}))
    lat = _latents(len(PROMPTS))
    ref = pipe(PROMPTS, negative_prompt=NEGATIVES, num_inference_steps=STEPS, guidance_scale=W,
               latents=_nchw(lat), height=32, width=32, output_type="latent",
               cross_attention_kwargs={"scale": scale}).images
    return pipe, ref


def _jaxdiff(sd):
    return generate(sd, PROMPTS, NEGATIVES, num_steps=STEPS, guidance_scale=W,
                    latents=_latents(len(PROMPTS)), seed=0)


def _compare(pipe, ref, out, base, label):
    img_err, _ = _check_against_pipeline(pipe, ref, out, label, W)
    effect = float(np.abs(out.float_images - base.float_images).max())
    print(f"{label}: the LoRA changes the images by up to {effect:.3f}")
    assert effect > max(0.05, 20 * img_err), (effect, img_err)


def test_peft_file_unfused_with_a_scale(folder, sd, tmp_path):
    pipe = _pipe(folder)
    file = _write_peft(_random_torch_lora(pipe), str(tmp_path / "peft.safetensors"))
    pipe, ref = _diffusers(folder, file, 0.6)
    _compare(pipe, ref, _jaxdiff(load_lora(sd, file, 0.6)), _jaxdiff(sd), "peft, scale 0.6")


def test_kohya_file_fused(folder, sd, tmp_path):
    pipe = _pipe(folder)
    file = _write_kohya(_random_torch_lora(pipe, seed=1), str(tmp_path / "kohya.safetensors"))
    pipe, ref = _diffusers(folder, file, 1.0)
    _compare(pipe, ref, _jaxdiff(fuse_lora(sd, file)), _jaxdiff(sd), "kohya, fused")


def test_kohya_file_on_ldm_unet_names(folder, sd, tmp_path):
    pipe = _pipe(folder)
    pairs = random_torch_lora({"unet": pipe.unet, "text_encoder": pipe.text_encoder},
                              LDM_TEST_TARGETS, TEXT_TARGETS, seed=5)
    assert ("unet", "up_blocks.0.upsamplers.0.conv") in pairs
    file = write_kohya(pairs, str(tmp_path / "ldm.safetensors"), unet_name=tiny_ldm_name,
                       te_prefixes={"text_encoder": "lora_te_"})
    pipe, ref = _diffusers(folder, file, 0.9, ldm=True)
    _compare(pipe, ref, _jaxdiff(load_lora(sd, file, 0.9)), _jaxdiff(sd), "kohya LDM names")


def test_save_lora_file_in_diffusers(folder, sd, tmp_path):
    """jaxdiff's adapter with its factor, and the file save_lora writes of it, read by
    diffusers, make the same image."""
    key = jax.random.key(3)
    lora = {"unet": init_lora(sd.params["unet"], [UNET_ATTENTION, UNET_FEED_FORWARD,
                                                  r"/proj_in$", r"^/mid_block/resnets_0/conv1$"],
                              rank=RANK, key=key),
            "text_encoder": init_lora(sd.params["text_encoder"], [TEXT_ATTENTION, r"/fc1$"],
                                      rank=RANK, key=key)}
    leaves, treedef = jax.tree.flatten(lora)
    keys = jax.random.split(jax.random.key(4), len(leaves))
    lora = jax.tree.unflatten(treedef, [
        x + 0.15 * jax.random.normal(k, x.shape) if x.ndim == 2 and x.shape[0] == RANK else x
        for x, k in zip(leaves, keys)])  # the up weights: random instead of zero
    factor = ALPHA / RANK
    file = save_lora(tmp_path / "saved", lora, scale=factor)
    pipe, ref = _diffusers(folder, file, 1.0)
    _compare(pipe, ref, _jaxdiff(load_lora(sd, lora, factor)), _jaxdiff(sd), "save_lora")
