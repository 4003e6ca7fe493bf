"""Export to diffusers: ``load_stable_diffusion(save_stable_diffusion(...))`` gives back the same
params bit for bit, the same configs, tokenizer ids, sampler and schedule; configs, samplers and
schedules diffusers cannot express raise naming the field. No torch here (the PyTorch side is
tests/parity/test_export_parity.py)."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

pytest.importorskip("safetensors")

from jaxdiff.convert import (  # noqa: E402
    clip_text_to_transformers,
    convert_clip_text_state_dict,
    convert_unet_state_dict,
    convert_vae_state_dict,
    sampler_from_diffusers_config,
    schedule_from_diffusers_config,
    scheduler_to_diffusers,
    unet_config_from_diffusers,
    unet_to_diffusers,
    vae_to_diffusers,
)
from jaxdiff.models import AutoencoderKLConfig, CLIPTextConfig, UNetConfig  # noqa: E402
from jaxdiff.models.autoencoder import autoencoder_param_shapes  # noqa: E402
from jaxdiff.models.clip_text import clip_text_param_shapes  # noqa: E402
from jaxdiff.models.unet import unet_param_shapes  # noqa: E402
from jaxdiff.finetune import FinetuneConfig, export_finetuned  # noqa: E402
from jaxdiff.pipelines import (  # noqa: E402
    GENERATION_DEFAULTS_FILE,
    GenerationDefaults,
    StableDiffusion,
    export_stable_diffusion,
    load_stable_diffusion,
    read_generation_defaults,
    save_stable_diffusion,
)
from jaxdiff.pipelines.tiny import write_tiny_tokenizer  # noqa: E402
from jaxdiff.samplers import get_sampler  # noqa: E402
from jaxdiff.schedules import make_schedule  # noqa: E402
from jaxdiff.text import CLIPTokenizer  # noqa: E402

MAX_LENGTH = 12


def random_params(shapes, seed: int) -> dict:
    """Random params of the given shapes: kernels ~ N(0, 1/fan_in), norm scales ~ 1 + N(0,
    0.1^2), biases ~ N(0, 0.1^2), embeddings ~ N(0, 0.5^2) (float32)."""
    rng = np.random.default_rng(seed)
    out = {}
    for path, s in sorted(flatten_dict(shapes).items()):
        z = rng.standard_normal(s.shape)
        if path[-1] == "scale":
            v = 1 + 0.1 * z
        elif path[-1] == "bias":
            v = 0.1 * z
        elif path[-1] == "embedding":
            v = 0.5 * z
        else:
            v = z / math.sqrt(max(1, int(np.prod(s.shape[:-1]))))
        out[path] = jnp.asarray(v, jnp.float32)
    return unflatten_dict(out)


def tiny_parts(tokenizer_dir: str, *, latent_channels: int = 3, seed: int = 0) -> dict:
    """A text-to-MNIST-shaped model: 1-channel 32x32 images, a 3-level VAE (f = 4, 8x8
    latents), a UNet with cross-attention at its lowest level and in the middle (as
    experiments/configs/mnist.py's CPU_MODEL_OVERRIDES, class tokens off), a small CLIP."""
    tokenizer = CLIPTokenizer.from_pretrained(write_tiny_tokenizer(tokenizer_dir, MAX_LENGTH))
    text = CLIPTextConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                          num_hidden_layers=2, num_attention_heads=4,
                          max_position_embeddings=MAX_LENGTH, eos_token_id=tokenizer.eos_token_id)
    vae = AutoencoderKLConfig(in_channels=1, out_channels=1, block_channels=(8, 16, 16),
                              latent_channels=latent_channels, norm_groups=4, sample_size=32,
                              scaling_factor=0.7)
    unet = UNetConfig(in_channels=latent_channels, out_channels=latent_channels,
                      block_channels=(8, 16, 32), layers_per_block=1,
                      attention=(None, None, "cross"), up_attention=(None, None, "cross"),
                      mid_attention="cross", num_heads=(1, 2, 4), norm_groups=4, context_dim=32,
                      class_conditioning="cross_attention")
    return dict(
        unet_params=random_params(unet_param_shapes(unet), seed), unet_config=unet,
        vae_params=random_params(autoencoder_param_shapes(vae), seed + 1), vae_config=vae,
        text_params=random_params(clip_text_param_shapes(text), seed + 2), text_config=text,
        tokenizer=tokenizer,
    )


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return tiny_parts(str(tmp_path_factory.mktemp("tok")))


def _assert_same_sampler(back, sampler):
    """``back`` (read from a scheduler config) has ``sampler``'s function and options."""
    assert back.fn is sampler.fn
    norm = {"eps": "epsilon", "v": "v_prediction"}
    for k, v in sampler.options.items():
        got = back.options[k]
        assert norm.get(got, got) == norm.get(v, v), (k, got, v)


def _equal_trees(a, b) -> bool:
    fa, fb = flatten_dict(a), flatten_dict(b)
    return set(fa) == set(fb) and all(
        np.asarray(fa[k]).dtype == np.asarray(fb[k]).dtype
        and np.array_equal(np.asarray(fa[k]), np.asarray(fb[k])) for k in fa)


@pytest.mark.slow
def test_round_trip_through_the_folder(parts, tmp_path):
    sampler = get_sampler("ddim", steps_offset=1, set_alpha_to_one=False, prediction_type="v")
    path = save_stable_diffusion(str(tmp_path / "sd"), **parts, sampler=sampler,
                                 schedule="cosine", num_timesteps=500)
    assert sorted(os.listdir(path)) == ["model_index.json", "scheduler", "text_encoder",
                                        "tokenizer", "unet", "vae"]
    assert sorted(os.listdir(os.path.join(path, "tokenizer"))) == [
        "merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]
    sd = load_stable_diffusion(path)
    assert _equal_trees(sd.params["unet"], parts["unet_params"])
    assert _equal_trees(sd.params["vae"], parts["vae_params"])
    assert _equal_trees(sd.params["text_encoder"], parts["text_params"])
    assert sd.vae_config == parts["vae_config"]
    assert sd.text_config == parts["text_config"]
    # The same model; fields that cannot matter (class tokens with no classes) may differ.
    back = dataclasses.replace(sd.unet_config, class_conditioning="cross_attention",
                               up_attention=(None, None, "cross"))
    assert back == parts["unet_config"]
    assert sd.sample_size == 8 and sd.vae_scale_factor == 4
    prompts = ["a cat", "the dog of a cat", "", "Zebra?!"]
    np.testing.assert_array_equal(sd.tokenizer(prompts).input_ids,
                                  parts["tokenizer"](prompts).input_ids)
    assert sd.tokenizer.max_length == MAX_LENGTH
    _assert_same_sampler(sd.sampler, sampler)
    np.testing.assert_array_equal(np.asarray(sd.schedule.alphas_cumprod),
                                  np.asarray(make_schedule("cosine", 500).alphas_cumprod))
    with open(os.path.join(path, "model_index.json")) as f:
        index = json.load(f)
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
    assert index["requires_safety_checker"] is False


@pytest.mark.slow
def test_export_an_in_memory_stable_diffusion(parts, tmp_path):
    # What the text-to-MNIST run holds: a StableDiffusion built in memory, with a diffusers
    # scheduler config (SD's DDIM settings) as its scheduler.
    config = {"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear",
              "beta_start": 0.00085, "beta_end": 0.012, "clip_sample": False,
              "set_alpha_to_one": False, "steps_offset": 1}
    sd = StableDiffusion(
        params={"unet": parts["unet_params"], "vae": parts["vae_params"],
                "text_encoder": parts["text_params"]},
        unet_config=parts["unet_config"], vae_config=parts["vae_config"],
        text_config=parts["text_config"], tokenizer=parts["tokenizer"],
        schedule=schedule_from_diffusers_config(config),
        sampler=sampler_from_diffusers_config(config), scheduler_config=config, sample_size=8)
    back = load_stable_diffusion(export_stable_diffusion(sd, str(tmp_path / "sd")))
    assert _equal_trees(back.params, sd.params)
    assert back.scheduler_config == config  # written as it is
    assert back.sample_size == 8 and back.sampler == sd.sampler


@pytest.mark.slow
def test_generation_defaults_travel_with_the_folder(parts, tmp_path):
    """Written by save_stable_diffusion, read into sd.generation_defaults, written back by
    export_stable_diffusion and by a full fine-tune's export; an export without them leaves no
    stale file behind."""
    d = GenerationDefaults.from_sampler(get_sampler("ddim", steps_offset=1), num_steps=25,
                                        guidance_scale=3.0, height=32, width=32,
                                        crop=(2, 2, 28, 28))
    path = save_stable_diffusion(str(tmp_path / "a"), **parts, generation_defaults=d)
    sd = load_stable_diffusion(path)
    assert sd.generation_defaults == d
    again = export_stable_diffusion(sd, str(tmp_path / "b"))
    assert read_generation_defaults(again) == d
    out = export_finetuned(str(tmp_path / "run"), sd, FinetuneConfig(mode="full"),
                           {"unet": sd.params["unet"]})
    assert read_generation_defaults(out["diffusers"]) == d
    save_stable_diffusion(again, **parts)
    assert not os.path.exists(os.path.join(again, GENERATION_DEFAULTS_FILE))
    assert load_stable_diffusion(again).generation_defaults is None
    with pytest.raises(ValueError, match="generation_defaults must be a GenerationDefaults"):
        save_stable_diffusion(str(tmp_path / "c"), **parts, generation_defaults={"num_steps": 3})
    with open(os.path.join(path, GENERATION_DEFAULTS_FILE), "w") as f:
        json.dump({"num_steps": 25, "guidance": 3}, f)
    with pytest.raises(ValueError, match="jaxdiff_generation.json: unknown key 'guidance'"):
        load_stable_diffusion(path)


@pytest.mark.slow
def test_float16_weights(parts, tmp_path):
    path = save_stable_diffusion(str(tmp_path / "sd16"), **parts, dtype="float16")
    sd = load_stable_diffusion(path)
    for got, given in zip(jax.tree.leaves(sd.params["unet"]),
                          jax.tree.leaves(parts["unet_params"])):
        np.testing.assert_array_equal(np.asarray(got),
                                      np.asarray(given).astype(np.float16).astype(np.float32))


@pytest.mark.slow
def test_per_part_exporters_invert_the_importers():
    # Per-level heads, depth and layers, a class embedding, linear projections, a 1-resnet
    # mid block: the state dict goes back through the importer unchanged.
    cfg = UNetConfig(in_channels=2, out_channels=2, block_channels=(8, 16), layers_per_block=(1, 2),
                     attention=("cross", "cross"), up_attention=(None, "cross"), mid_layers=0,
                     mid_attention=None, num_heads=(2, 4), transformer_depth=(1, 2),
                     use_linear_projection=True, context_dim=12, norm_groups=4, num_classes=3,
                     class_conditioning="embedding", freq_shift=1.0, flip_sin_to_cos=False,
                     time_embed_dim=24)
    params = random_params(unet_param_shapes(cfg), 3)
    state, config = unet_to_diffusers(params, cfg, sample_size=4)
    assert config["num_class_embeds"] == 4 and config["mid_block_type"] == "UNetMidBlock2D"
    assert config["up_block_types"] == ["CrossAttnUpBlock2D", "UpBlock2D"]
    back = unet_config_from_diffusers(json.loads(json.dumps(config)))
    assert _equal_trees(convert_unet_state_dict(state, back), params)
    assert all(v.dtype == np.float32 and v.flags.c_contiguous for v in state.values())

    vae = AutoencoderKLConfig(block_channels=(8, 8), latent_channels=2, norm_groups=4,
                              latents_mean=(0.1, -0.2), latents_std=(1.0, 2.0), mid_attention=False,
                              use_quant_conv=False)
    vparams = random_params(autoencoder_param_shapes(vae), 4)
    state, config = vae_to_diffusers(vparams, vae)
    assert config["latents_std"] == [1.0, 2.0] and config["use_quant_conv"] is False
    assert _equal_trees(convert_vae_state_dict(state, vae), vparams)

    text = CLIPTextConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, max_position_embeddings=8, eos_token_id=2,
                          hidden_act="gelu", projection_dim=6)
    tparams = random_params(clip_text_param_shapes(text), 5)
    state, config = clip_text_to_transformers(tparams, text, bos_token_id=0, pad_token_id=1)
    assert config["architectures"] == ["CLIPTextModelWithProjection"]
    assert all(k.startswith("text_model.") or k == "text_projection.weight" for k in state)
    assert _equal_trees(convert_clip_text_state_dict(state, text), tparams)


def test_params_must_match_their_config(parts):
    params = flatten_dict(parts["unet_params"])
    path = next(iter(params))
    params.pop(path)
    with pytest.raises(ValueError, match="1 missing: " + "/".join(path)):
        unet_to_diffusers(unflatten_dict(params), parts["unet_config"])


@pytest.mark.parametrize("change,match", [
    (dict(attention=("self", None, "cross")), "unet_config.attention"),
    (dict(num_classes=10), "unet_config.class_conditioning='cross_attention'"),
    (dict(mid_layers=2), "unet_config.mid_attention='cross' with mid_layers=2"),
])
def test_unet_fields_diffusers_cannot_express(parts, change, match):
    cfg = dataclasses.replace(parts["unet_config"], **change)
    with pytest.raises(ValueError, match=match):
        unet_to_diffusers(random_params(unet_param_shapes(cfg), 0), cfg)


@pytest.mark.parametrize("kwargs,match", [
    (dict(sampler=get_sampler("ddim", eta=0.5)), r"eta=0\.5 .*pipe\(\.\.\., eta=\.\.\.\)"),
    (dict(sampler="dpmpp_2m", schedule="cosine"), "round_timesteps=True"),
    (dict(sampler="euler", schedule_kwargs=dict(beta_start=0.001), schedule="cosine"),
     r"takes \['max_beta', 's'\]"),
    (dict(schedule="cosine", schedule_kwargs=dict(s=0.01)), "s=0.01: diffusers' squaredcos"),
    (dict(image_size=28), "image_size=28 must be a multiple of 8"),
    (dict(sampler=get_sampler("ddim", clip_x0=1.0, steps_offset=1)), "clip_x0=1.0: "),
    (dict(sampler="ddim"), "steps_offset=0 with spacing='leading'"),
])
def test_save_errors_name_the_field(parts, tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        save_stable_diffusion(str(tmp_path / "bad"), **parts, **kwargs)
    assert not os.path.exists(tmp_path / "bad" / "unet")  # nothing written


def test_save_checks_that_the_parts_fit(parts, tmp_path):
    text = dataclasses.replace(parts["text_config"], hidden_size=64, intermediate_size=64)
    with pytest.raises(ValueError, match="unet_config.context_dim=32 must equal "
                                         "text_config.hidden_size=64"):
        save_stable_diffusion(str(tmp_path / "a"), **{**parts, "text_config": text})
    vae = dataclasses.replace(parts["vae_config"], latent_channels=4)
    with pytest.raises(ValueError, match="unet_config.in_channels=3 must equal "
                                         "vae_config.latent_channels=4"):
        save_stable_diffusion(str(tmp_path / "b"), **{**parts, "vae_config": vae})
    xl = dataclasses.replace(parts["unet_config"], added_cond="text_time", added_time_dim=4,
                             added_cond_input_dim=40)
    with pytest.raises(ValueError, match="unet_config.added_cond='text_time': an SDXL UNet"):
        save_stable_diffusion(str(tmp_path / "c"), **{**parts, "unet_config": xl})
    lcm = dataclasses.replace(parts["unet_config"], time_cond_dim=8)
    with pytest.raises(ValueError, match="unet_config.time_cond_dim=8: an LCM UNet"):
        save_stable_diffusion(str(tmp_path / "d"), **{**parts, "unet_config": lcm})


@pytest.mark.parametrize("name,options,schedule", [
    ("ddim", dict(clip_x0=1.0, spacing="trailing"), "linear"),
    ("ddpm", dict(variance_type="fixed_large"), "scaled_linear"),
    ("euler_ancestral", dict(prediction_type="v"), "cosine"),
    ("euler", dict(sigma_schedule="karras"), "linear"),
    ("dpmpp_2m_karras", {}, "scaled_linear"),
    ("dpm_solver", dict(round_timesteps=False, solver_order=3), "cosine"),
    ("unipc", dict(disable_corrector=(0,)), "linear"),
    ("heun", {}, "cosine"),
    ("ddpm", {}, "sigmoid"),  # the one class with sigmoid betas
    ("lcm", dict(original_inference_steps=20), "scaled_linear"),
    ("tcd", dict(original_inference_steps=20, prediction_type="v"), "scaled_linear"),
    ("plms", dict(steps_offset=1), "scaled_linear"),
])
def test_scheduler_round_trip(name, options, schedule):
    sampler = get_sampler(name, **options)
    kw = dict(beta_start=0.00085, beta_end=0.012) if schedule == "scaled_linear" else {}
    config = json.loads(json.dumps(scheduler_to_diffusers(sampler, schedule, 1000, **kw)))
    _assert_same_sampler(sampler_from_diffusers_config(config), sampler)
    np.testing.assert_array_equal(
        np.asarray(schedule_from_diffusers_config(config).alphas_cumprod),
        np.asarray(make_schedule(schedule, 1000, **kw).alphas_cumprod))


def test_scheduler_zero_terminal_snr():
    config = scheduler_to_diffusers("ddim", "linear", 1000, rescale_to_zero_terminal_snr=True)
    assert config["rescale_betas_zero_snr"] is True
    np.testing.assert_array_equal(
        np.asarray(schedule_from_diffusers_config(config).alphas_cumprod),
        np.asarray(make_schedule("linear", 1000, rescale_to_zero_terminal_snr=True).alphas_cumprod))
    # diffusers' Euler schedulers floor the last alpha_cumprod: not jaxdiff's schedule
    with pytest.raises(ValueError, match="rescale_to_zero_terminal_snr=True: "
                                         "EulerDiscreteScheduler loads a different"):
        scheduler_to_diffusers("euler", "linear", 1000, rescale_to_zero_terminal_snr=True)
    # Heun has no rescale_betas_zero_snr (diffusers ignores it): not written, refused if asked
    assert "rescale_betas_zero_snr" not in scheduler_to_diffusers("heun", "linear", 1000)
    with pytest.raises(ValueError, match="HeunDiscreteScheduler has no rescale_betas_zero_snr"):
        scheduler_to_diffusers("heun", "linear", 1000, rescale_to_zero_terminal_snr=True)
    # sigmoid betas: DDPM only (the other classes raise NotImplementedError in diffusers)
    with pytest.raises(ValueError, match="does not implement beta_schedule='sigmoid'"):
        scheduler_to_diffusers("ddim", "sigmoid", 1000)


def test_scheduler_from_betas():
    betas = np.linspace(1e-4, 0.03, 100) ** 1.5
    config = scheduler_to_diffusers("ddim", betas)
    assert config["num_train_timesteps"] == 100 and len(config["trained_betas"]) == 100
    np.testing.assert_allclose(np.asarray(schedule_from_diffusers_config(config).betas),
                               betas.astype(np.float32), rtol=0, atol=0)
