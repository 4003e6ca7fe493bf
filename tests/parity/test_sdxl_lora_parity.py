"""SDXL LoRAs in jaxdiff's pipeline against ``StableDiffusionXLPipeline.load_lora_weights`` (peft
backend) on one tiny random SDXL folder (:func:`~jaxdiff.pipelines.tiny.
write_tiny_stable_diffusion_xl`), float32, 32x32 images, the folder's Euler scheduler, 3 steps,
guidance 5, encoded negative prompts, the same initial latents.

The LoRA files are written by the tests from random weights in each format's key layout, with
module names taken from the torch models (not from jaxdiff's converters), ``alpha != rank``, on
the UNet (attention, feed-forward, ``proj_in`` / ``proj_out``, resnet convs and the time
projection, the down- and upsampler convs) and both text encoders (attention, ``mlp.fc1``):

- diffusers / peft: ``unet.*``, ``text_encoder.*``, ``text_encoder_2.*`` keys, alpha in the
  ``lora_adapter_metadata``; unfused with a scale;
- kohya with diffusers-named UNet layers, ``lora_te1_`` / ``lora_te2_``; fused;
- kohya on the original LDM / SGM UNet names (``lora_unet_input_blocks_3_1_...``, as sd-scripts'
  SDXL trainer writes them), from the hand-written table :data:`TINY_LDM` of this folder's UNet
  (2 levels, 1 resnet each, attention in the second only), not from jaxdiff's mapping.

diffusers applies the scale with ``cross_attention_kwargs={"scale": s}`` (UNet and both text
encoders). Tolerances as tests/parity/test_sdxl_pipeline_parity.py (``pipeline_rtol`` with both
text encoders and the LoRA layers counted in the networks' depth, ``image_atol``); each test also
checks that the LoRA changes the image by far more than that bound, so that a LoRA ignored on
both sides cannot pass.
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

import safetensors.torch  # noqa: E402

from jaxdiff.pipelines import fuse_lora, generate, load_lora, load_stable_diffusion  # noqa: E402
from jaxdiff.pipelines.tiny import write_tiny_stable_diffusion_xl  # noqa: E402
from tests.parity.test_sdxl_pipeline_parity import check_latents, latents, nchw  # noqa: E402

pytestmark = pytest.mark.slow  # every test here takes > 1.5 s on 2 cores

RANK, ALPHA, STEPS, W = 4, 3.0, 3, 5.0
PROMPTS, NEGATIVES = ["a cat", "the dog of a cat"], ["", "a dog"]
UNET_TARGETS = re.compile(
    r"(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.0\.proj|ff\.net\.2|proj_in|proj_out|"
    r"down_blocks\.0\.resnets\.0\.conv1|mid_block\.resnets\.1\.conv2|"
    r"up_blocks\.1\.resnets\.0\.conv_shortcut|down_blocks\.1\.resnets\.0\.time_emb_proj|"
    r"downsamplers\.0\.conv|upsamplers\.0\.conv)$")
TEXT_TARGETS = re.compile(r"(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.fc1)$")
PARTS = ("unet", "text_encoder", "text_encoder_2")

# The LDM / SGM names of the tiny folder's UNet blocks (2 levels, layers_per_block 1, attention
# in level 1 only), written out by hand: input_blocks 0 conv_in, 1 level 0's resnet, 2 its
# downsampler, 3 level 1's resnet + attention; the middle block resnet, attention, resnet;
# output_blocks 0-1 the lower-resolution up level (resnet + attention, the upsampler third in
# block 1), 2-3 the full-resolution one (resnets only).
TINY_LDM = {
    "conv_in": "input_blocks.0.0",
    "down_blocks.0.resnets.0": "input_blocks.1.0",
    "down_blocks.0.downsamplers.0.conv": "input_blocks.2.0.op",
    "down_blocks.1.resnets.0": "input_blocks.3.0",
    "down_blocks.1.attentions.0": "input_blocks.3.1",
    "mid_block.resnets.0": "middle_block.0",
    "mid_block.attentions.0": "middle_block.1",
    "mid_block.resnets.1": "middle_block.2",
    "up_blocks.0.resnets.0": "output_blocks.0.0",
    "up_blocks.0.attentions.0": "output_blocks.0.1",
    "up_blocks.0.resnets.1": "output_blocks.1.0",
    "up_blocks.0.attentions.1": "output_blocks.1.1",
    "up_blocks.0.upsamplers.0.conv": "output_blocks.1.2.conv",
    "up_blocks.1.resnets.0": "output_blocks.2.0",
    "up_blocks.1.resnets.1": "output_blocks.3.0",
}
RESNET_LDM = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
              "conv_shortcut": "skip_connection"}


def tiny_ldm_name(name: str) -> str:
    """The LDM name of a diffusers module of the tiny folders' UNet (:data:`TINY_LDM`)."""
    if name in TINY_LDM:
        return TINY_LDM[name]
    for prefix, ldm in TINY_LDM.items():
        if name.startswith(prefix + "."):
            rest = name[len(prefix) + 1:]
            return f"{ldm}.{RESNET_LDM[rest] if '.resnets.' in prefix else rest}"
    raise KeyError(name)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("sdxl_lora"))
    write_tiny_stable_diffusion_xl(path, seed=0)
    return path


@pytest.fixture(scope="module")
def sd(folder):
    return load_stable_diffusion(folder)


def _pipe(folder):
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_torch_lora(models, unet_targets, text_targets, seed=0):
    """``{(part, module name): (A [r, in(, kh, kw)], B [out, r(, 1, 1)])}`` on the target
    modules of the torch ``models`` (``{part: module}``); ``B`` large enough to change the image
    visibly."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for part, model in models.items():
        rx = unet_targets if part == "unet" else text_targets
        for name, module in model.named_modules():
            if not rx.search(name):
                continue
            w = module.weight
            fan_in = int(np.prod(w.shape[1:]))
            a = (torch.rand((RANK, *w.shape[1:]), generator=g) * 2 - 1) / fan_in ** 0.5
            b = torch.randn((w.shape[0], RANK) + (1, 1) * (w.ndim == 4), generator=g) * 0.15
            out[(part, name)] = (a.contiguous(), b.contiguous())
    return out


def _pairs(pipe, seed):
    pairs = random_torch_lora({p: getattr(pipe, p) for p in PARTS}, UNET_TARGETS, TEXT_TARGETS,
                              seed)
    # 4 transformers (down, mid, 2 up) of 2 blocks of 8 attention + 2 feed-forward layers, their
    # proj_in / proj_out, 6 resnet / sampler layers; 2 text layers of 5 per encoder
    assert sum(p == "unet" for p, _ in pairs) == 4 * 2 * 10 + 4 * 2 + 6
    assert sum(p == "text_encoder_2" for p, _ in pairs) == 2 * 5
    return pairs


def _write_peft(pairs, path):
    state, targets = {}, {p: [] for p in PARTS}
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


def write_kohya(pairs, path, unet_name=lambda name: name, te_prefixes=None):
    """kohya keys: ``lora_unet_`` + ``unet_name(module)`` and the text encoders' prefixes
    (``{part: prefix}``) + their module names with ``text_model.`` (as sd-scripts names them;
    transformers 5's ``CLIPTextModel`` has none), every ``.`` as ``_``, with ``.alpha``."""
    prefixes = {"unet": "lora_unet_", **(te_prefixes or {"text_encoder": "lora_te1_",
                                                         "text_encoder_2": "lora_te2_"})}
    state = {}
    for (part, name), (a, b) in pairs.items():
        if part == "unet":
            module = unet_name(name)
        else:
            module = name if name.startswith("text_model.") else f"text_model.{name}"
        key = prefixes[part] + module.replace(".", "_")
        state[f"{key}.lora_down.weight"] = a
        state[f"{key}.lora_up.weight"] = b
        state[f"{key}.alpha"] = torch.tensor(ALPHA)
    safetensors.torch.save_file(state, path)
    return path


def _diffusers(folder, file, scale):
    pipe = _pipe(folder)
    pipe.load_lora_weights(file)
    ref = pipe(PROMPTS, negative_prompt=NEGATIVES, num_inference_steps=STEPS, guidance_scale=W,
               latents=nchw(latents(len(PROMPTS))), height=32, width=32, output_type="latent",
               cross_attention_kwargs={"scale": scale}).images
    return pipe, ref


def _jaxdiff(sd):
    return generate(sd, PROMPTS, NEGATIVES, num_steps=STEPS, guidance_scale=W,
                    latents=latents(len(PROMPTS)), seed=0)


def _compare(pipe, ref, out, base, label):
    img_err, _ = check_latents(pipe, ref, out, W)
    effect = float(np.abs(out.float_images - base.float_images).max())
    print(f"{label}: the LoRA changes the images by up to {effect:.3f}")
    assert effect > max(0.05, 20 * img_err), (effect, img_err)


def test_peft_file_with_both_text_encoders(folder, sd, tmp_path):
    file = _write_peft(_pairs(_pipe(folder), 0), str(tmp_path / "peft.safetensors"))
    pipe, ref = _diffusers(folder, file, 0.7)
    _compare(pipe, ref, _jaxdiff(load_lora(sd, file, 0.7)), _jaxdiff(sd), "SDXL peft, scale 0.7")


def test_kohya_file_te1_te2_fused(folder, sd, tmp_path):
    file = write_kohya(_pairs(_pipe(folder), 1), str(tmp_path / "kohya.safetensors"))
    pipe, ref = _diffusers(folder, file, 1.0)
    _compare(pipe, ref, _jaxdiff(fuse_lora(sd, file)), _jaxdiff(sd), "SDXL kohya, fused")


def test_kohya_file_on_ldm_unet_names(folder, sd, tmp_path):
    pairs = _pairs(_pipe(folder), 2)
    file = write_kohya(pairs, str(tmp_path / "sgm.safetensors"), unet_name=tiny_ldm_name)
    keys = safetensors.torch.load_file(file)
    assert "lora_unet_input_blocks_3_1_transformer_blocks_1_attn2_to_k.alpha" in keys
    assert "lora_unet_output_blocks_1_2_conv.alpha" in keys
    assert not any("down_blocks" in k or "up_blocks" in k for k in keys)
    pipe, ref = _diffusers(folder, file, 0.8)
    _compare(pipe, ref, _jaxdiff(load_lora(sd, file, 0.8)), _jaxdiff(sd), "SDXL kohya LDM")
