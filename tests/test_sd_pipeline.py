"""The Stable Diffusion pipeline: loading errors, variants, one compile per setting, the guidance
scale's one formula (a new scale compiles nothing), the program cache, embeddings, bf16, sharding
over simulated devices, the command line. A tiny random folder written by diffusers
(``jaxdiff.pipelines.tiny``); parity with diffusers is in tests/parity, loading defects in
test_sd_loading.py, image inputs / outputs in test_sd_images.py, the command line's user errors
in test_text_to_image.py."""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import shutil
import subprocess
import sys
import weakref

import numpy as np
import pytest

import jax
import jax.numpy as jnp

pytest.importorskip("torch")
pytest.importorskip("diffusers")

from experiments import text_to_image  # noqa: E402
from experiments.cli import ConfigError  # noqa: E402
from jaxdiff.pipelines import (  # noqa: E402
    PROGRAM_CACHE,
    LoadOptionError,
    encode_prompt,
    generate,
    load_stable_diffusion,
)
from jaxdiff.sharding import make_mesh  # noqa: E402
from jaxdiff.pipelines.tiny import write_tiny_stable_diffusion  # noqa: E402

pytestmark = pytest.mark.slow  # every test here takes > 1.5 s on 2 cores


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny_sd"))
    write_tiny_stable_diffusion(path, variant="fp16")  # *.fp16.* weight files
    return path


@pytest.fixture(scope="module")
def sd(folder):
    return load_stable_diffusion(folder, variant="fp16")


def _copy(folder, tmp_path):
    dst = str(tmp_path / "copy")
    shutil.copytree(folder, dst)
    return dst


def _edit_json(path, **changes):
    with open(path) as f:
        d = json.load(f)
    d.update(changes)
    with open(path, "w") as f:
        json.dump(d, f)


def test_load_errors(folder, tmp_path):
    with pytest.raises(ValueError, match="not a folder"):
        load_stable_diffusion(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="model_index.json"):
        load_stable_diffusion(str(tmp_path))
    with pytest.raises(LoadOptionError, match="variant=None: no weights file.*fp16") as e:
        load_stable_diffusion(folder)  # only fp16-variant files were written
    assert (e.value.option, e.value.value) == ("variant", "fp16")
    assert str(e.value).endswith("pass variant='fp16'")
    copy = _copy(folder, tmp_path)
    _edit_json(os.path.join(copy, "model_index.json"),
               text_encoder_2=["transformers", "CLIPTextModelWithProjection"])
    with pytest.raises(ValueError, match="StableDiffusionPipeline has no text_encoder_2.*SDXL"):
        load_stable_diffusion(copy, variant="fp16")
    shutil.rmtree(copy)
    copy = _copy(folder, tmp_path)
    _edit_json(os.path.join(copy, "unet", "config.json"), addition_embed_type="text_time")
    with pytest.raises(ValueError, match="unet/config.json.*'text_time' UNet is SDXL's"):
        load_stable_diffusion(copy, variant="fp16")
    shutil.rmtree(copy)
    copy = _copy(folder, tmp_path)
    _edit_json(os.path.join(copy, "unet", "config.json"), time_cond_proj_dim=8)
    with pytest.raises(ValueError, match="(?s)unet: weights: .*missing keys: time_embedding"):
        load_stable_diffusion(copy, variant="fp16")
    shutil.rmtree(copy)
    copy = _copy(folder, tmp_path)
    shutil.rmtree(os.path.join(copy, "vae"))
    with pytest.raises(ValueError, match="no vae/ folder"):
        load_stable_diffusion(copy, variant="fp16")
    shutil.rmtree(copy)
    copy = _copy(folder, tmp_path)
    _edit_json(os.path.join(copy, "scheduler", "scheduler_config.json"),
               _class_name="FlowMatchEulerDiscreteScheduler")  # no jaxdiff sampler for it
    with pytest.raises(LoadOptionError,
                       match="FlowMatchEulerDiscreteScheduler.*pass sampler='dpmpp_2m'"):
        load_stable_diffusion(copy, variant="fp16")
    sd = load_stable_diffusion(copy, variant="fp16", sampler="dpmpp_2m")
    assert sd.sampler.name == "dpmpp_2m" and sd.sampler.options["prediction_type"] == "eps"
    # An SD 1.x folder runs with its own scheduler: PNDMScheduler (PLMS), with DDIM's
    # clip_sample as SD 1.5's scheduler_config.json has it.
    _edit_json(os.path.join(copy, "scheduler", "scheduler_config.json"),
               _class_name="PNDMScheduler", skip_prk_steps=True, steps_offset=1,
               set_alpha_to_one=False, clip_sample=False)
    sd = load_stable_diffusion(copy, variant="fp16")
    assert sd.sampler.name == "pndm" and sd.sampler.options["skip_prk_steps"] is True


def test_compiles_once_per_setting(sd, caplog):
    PROGRAM_CACHE.clear()   # another test in this process may have compiled these settings
    lat = np.zeros((2, 16, 16, 4), np.float32)

    def compiles(**kw):
        caplog.clear()
        with caplog.at_level(logging.WARNING), jax.log_compiles():
            out = generate(sd, **kw)
        return out, sum("_sd_program" in r.getMessage() and "Compiling" in r.getMessage()
                        for r in caplog.records)

    a, n1 = compiles(prompt=["a cat", "a dog"], num_steps=2, seed=0)
    b, n2 = compiles(prompt=["the dog", "of"], negative_prompt="cat", num_steps=2, seed=1,
                     guidance_scale=4.0)
    _, n3 = compiles(prompt=["a", "b"], num_steps=2, latents=lat)
    assert (n1, n2) == (1, 0), (n1, n2)
    assert n3 == 1  # given latents: another input structure, compiled once
    assert a.images.dtype == np.uint8 and a.images.shape == (2, 32, 32, 3)
    assert not np.array_equal(a.images, b.images)


def test_embeddings_seed_and_errors(sd):
    kw = dict(num_steps=2, seed=3)
    ref = generate(sd, ["a cat"], ["dog"], **kw)
    emb = encode_prompt(sd, sd.params, jnp.asarray(sd.tokenizer(["a cat"]).input_ids))
    neg = encode_prompt(sd, sd.params, jnp.asarray(sd.tokenizer(["dog"]).input_ids))
    out = generate(sd, prompt_embeds=emb, negative_prompt_embeds=neg, **kw)
    np.testing.assert_allclose(out.float_images, ref.float_images, atol=1e-5)
    again = generate(sd, ["a cat"], ["dog"], **kw)
    np.testing.assert_array_equal(again.images, ref.images)  # seeded: reproducible
    with pytest.raises(ValueError, match="height must be a multiple of 8"):
        generate(sd, "a cat", height=36, width=32, **kw)
    with pytest.raises(ValueError, match="strength"):
        generate(sd, "a cat", image=np.zeros((32, 32, 3), np.uint8), strength=0.1, **kw)
    # LCM's image-to-image grid needs int(original_inference_steps * strength) >= num_steps
    # (parity: tests/parity/test_sd_pipeline_parity.py)
    with pytest.raises(ValueError, match=r"strength=0.03 keeps .* use strength >= 0.04"):
        generate(sd, "a cat", image=np.zeros((32, 32, 3), np.uint8), sampler="lcm",
                 strength=0.03, **kw)
    with pytest.raises(ValueError, match="seed or key"):
        generate(sd, "a cat", num_steps=2)
    with pytest.raises(ValueError, match="prompt"):
        generate(sd, None, num_steps=2, seed=0)


def test_bf16_runs_close_to_float32(folder, sd):
    sd16 = load_stable_diffusion(folder, variant="fp16", dtype=jnp.bfloat16)
    assert jax.tree.leaves(sd16.params)[0].dtype == jnp.bfloat16
    a = generate(sd, ["a cat"], ["dog"], num_steps=2, seed=3)  # compiled by the test above
    b = generate(sd16, ["a cat"], ["dog"], num_steps=2, seed=3)
    assert np.isfinite(b.float_images).all()
    assert np.abs(a.float_images - b.float_images).mean() < 0.05


def test_sharded_over_two_devices_matches_one(folder, sd):
    lat = np.random.default_rng(0).standard_normal((3, 16, 16, 4)).astype(np.float32)
    ref = generate(sd, ["a cat", "a dog", "the"], num_steps=2, latents=lat)
    np.save(os.path.join(folder, "..", "lat.npy"), lat)
    # Two meshes in one process (one device, then both; the first dropped before the second
    # is made): each gets its own program (the cache keys on the mesh, not on its id()).
    code = (
        "import gc, sys, numpy as np, jax\n"
        "from jaxdiff.pipelines import PROGRAM_CACHE, generate, load_stable_diffusion\n"
        "from jaxdiff.sharding import make_mesh\n"
        "assert jax.device_count() == 2\n"
        "sd = load_stable_diffusion(sys.argv[1], variant='fp16')\n"
        "lat = np.load(sys.argv[2])\n"
        "one = generate(sd, ['a cat', 'a dog', 'the'], num_steps=2, latents=lat,\n"
        "               mesh=make_mesh(jax.devices()[:1]))\n"
        "gc.collect()\n"
        "out = generate(sd, ['a cat', 'a dog', 'the'], num_steps=2, latents=lat)\n"
        "assert PROGRAM_CACHE.stats()['misses'] == 2, PROGRAM_CACHE.stats()\n"
        "np.testing.assert_allclose(one.float_images, out.float_images, atol=1e-5)\n"
        "np.save(sys.argv[3], out.float_images)\n"
    )
    out_path = os.path.join(folder, "..", "sharded.npy")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "JAX_PLATFORMS": "cpu"}
    subprocess.run([sys.executable, "-c", code, folder, os.path.join(folder, "..", "lat.npy"),
                    out_path], check=True, env=env, timeout=300)
    np.testing.assert_allclose(np.load(out_path), ref.float_images, atol=1e-5)


def test_command_line(folder, tmp_path, capsys):
    out = str(tmp_path / "img.png")
    images = text_to_image.main(["--model", folder, "--variant", "fp16", "--prompt", "a cat",
                                 "--negative_prompt", "dog", "--steps", "2", "--seed", "1",
                                 "--out", out])
    assert os.path.isfile(out) and images.shape == (1, 32, 32, 3)
    with pytest.raises(ConfigError, match="model_index.json"):
        text_to_image.main(["--model", str(tmp_path), "--prompt", "x"])
    with pytest.raises(ConfigError, match="--prompt is required"):
        text_to_image.main(["--model", folder])
    with pytest.raises(SystemExit) as e:
        text_to_image.cli_main(["--model", folder, "--variant", "fp16", "--prompt", "x",
                                "--height", "20"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().startswith("error: --height must be a multiple")
    with pytest.raises(ConfigError, match="clip_skip"):
        text_to_image.main(["--model", folder, "--variant", "fp16", "--prompt", "x",
                            "--clip_skip", "99"])


def _compiles(caplog, fn, **kw):
    """(result, number of ``_sd_program`` XLA compilations) of ``fn(**kw)``."""
    caplog.clear()
    with caplog.at_level(logging.WARNING), jax.log_compiles():
        out = fn(**kw)
    return out, sum("_sd_program" in r.getMessage() and "Compiling" in r.getMessage()
                    for r in caplog.records)


def test_a_new_guidance_scale_compiles_nothing(sd, caplog):
    """Every w != 1 runs one program with w traced; w == 1 (the conditional model) is the only
    other program. The cache is cleared first: another test in this process (the LoRA parity
    tests run 3 steps too) may have compiled these settings."""
    PROGRAM_CACHE.clear()
    kw = dict(prompt=["a cat"], negative_prompt=["dog"], num_steps=3, seed=0)
    before = PROGRAM_CACHE.stats()
    outs, counts = {}, {}
    for w in (7.5, 3.0, 0.0, -2.0, 0.5, 1.0, 1.0, 2.0):
        outs[w], n = _compiles(caplog, generate, sd=sd, guidance_scale=w, **kw)
        counts[w] = counts.get(w, 0) + n
    assert counts == {7.5: 1, 3.0: 0, 0.0: 0, -2.0: 0, 0.5: 0, 1.0: 1, 2.0: 0}, counts
    after = PROGRAM_CACHE.stats()
    assert after["misses"] - before["misses"] == 2      # the guided and the conditional program
    assert after["hits"] - before["hits"] == 6
    assert not np.array_equal(outs[3.0].images, outs[7.5].images)   # w really is an input


def test_guidance_scale_is_one_formula(sd):
    """w = 0 is the unconditional model (the negative prompt alone, as the prompt at w = 1); with
    the same embedding for both branches every w gives the same image; NaN / inf are refused."""
    lat = np.random.default_rng(1).standard_normal((1, 16, 16, 4)).astype(np.float32)
    kw = dict(num_steps=2, latents=lat)
    w0 = generate(sd, ["a cat"], ["the dog"], guidance_scale=0.0, **kw)
    neg_alone = generate(sd, ["the dog"], guidance_scale=1.0, **kw)
    cat_alone = generate(sd, ["a cat"], guidance_scale=1.0, **kw)
    # a 2B batch against a B batch: float32 rounding only (images in [0, 1])
    np.testing.assert_allclose(w0.float_images, neg_alone.float_images, atol=1e-5)
    assert np.abs(w0.float_images - cat_alone.float_images).max() > 1e-2  # not the prompt
    emb = encode_prompt(sd, sd.params, jnp.asarray(sd.tokenizer(["a cat"]).input_ids))
    same = [generate(sd, prompt_embeds=emb, negative_prompt_embeds=emb, guidance_scale=w,
                     **kw).float_images for w in (0.0, 3.0, -2.0)]
    np.testing.assert_allclose(same[1], same[0], atol=1e-6)
    np.testing.assert_allclose(same[2], same[0], atol=1e-6)
    for bad in (float("nan"), float("inf"), -float("inf"), "7.5", None):
        with pytest.raises(ValueError, match="guidance_scale must be a finite number"):
            generate(sd, ["a cat"], guidance_scale=bad, **kw)


def test_guidance_prompt_is_guidance_along_another_prompt(sd):
    """cond + (w - 1) (guide - uncond): the prompt as its own guidance prompt is classifier-free
    guidance, the negative prompt as the guidance prompt is the prompt alone (w = 1), another
    prompt changes the image; the settings it cannot run with are refused."""
    lat = np.random.default_rng(1).standard_normal((2, 16, 16, 4)).astype(np.float32)
    kw = dict(num_steps=2, latents=lat, guidance_scale=3.0)
    prompts = ["a cat", "a dog"]
    cfg = generate(sd, prompts, **kw)
    same = generate(sd, prompts, guidance_prompt=prompts, **kw)
    np.testing.assert_allclose(same.float_images, cfg.float_images, atol=1e-5)
    alone = generate(sd, prompts, guidance_prompt="", **kw)     # guide == uncond: no guidance
    cond = generate(sd, prompts, **dict(kw, guidance_scale=1.0))
    np.testing.assert_allclose(alone.float_images, cond.float_images, atol=1e-5)
    other = generate(sd, prompts, guidance_prompt=["a dog", "a cat"], **kw)
    assert np.abs(other.float_images - cfg.float_images).max() > 1e-2
    for extra, message in ((dict(guidance_scale=1.0), "unguided"),
                           (dict(guidance_rescale=0.5), "guidance_rescale"),
                           (dict(guidance_prompt=["a", "b", "c"]), "3 entries for 2 prompts")):
        with pytest.raises(ValueError, match=message):
            generate(sd, prompts, **{**kw, "guidance_prompt": "x", **extra})


def test_program_cache_reuses_and_tells_settings_apart(sd, caplog):
    kw = dict(prompt=["a cat"], num_steps=2, seed=0, guidance_scale=7.5)
    generate(sd, **kw)                                   # compiled here or by an earlier test
    key = PROGRAM_CACHE.keys()[-1]
    before = PROGRAM_CACHE.stats()
    _, n_same = _compiles(caplog, generate, sd=sd, **kw)
    mesh = make_mesh()                                   # made again, equal: the same program
    assert mesh == key.mesh and hash(mesh) == hash(key.mesh)
    _, n_mesh = _compiles(caplog, generate, sd=sd, mesh=mesh, **kw)
    other = sd.replace(params=jax.tree.map(lambda p: p * 1.0, sd.params))  # same configs
    _, n_params = _compiles(caplog, generate, sd=other, **kw)
    assert (n_same, n_mesh, n_params) == (0, 0, 0)
    assert PROGRAM_CACHE.stats()["misses"] == before["misses"]
    # programs never hold the model: dropping it frees its parameters, the program stays
    ref = weakref.ref(other)
    del other
    gc.collect()
    assert ref() is None and key in PROGRAM_CACHE
    # another sampler option is another program
    _, n_option = _compiles(caplog, generate, sd=sd, sampler="ddim",
                            sampler_options={"clip_x0": 1.0}, **kw)
    assert n_option == 1 and PROGRAM_CACHE.stats()["misses"] == before["misses"] + 1
    new = PROGRAM_CACHE.keys()[-1]
    assert new.sampler_options != key.sampler_options and new.num_steps == key.num_steps


def test_long_prompt_warns_with_the_dropped_text(sd, caplog):
    words = "first " + "a cat " * 20 + "last"    # the tiny tokenizer keeps 14 tokens
    negative = "blurry " + "a dog " * 20 + "grainy"
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="jaxdiff.pipelines.stable_diffusion"):
        generate(sd, ["a cat", words], [negative, ""], num_steps=2, seed=0, guidance_scale=2.0)
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(msgs) == 2, msgs
    assert msgs[0].startswith("prompt[1] is longer than the 14 tokens"), msgs[0]
    assert msgs[0].endswith(" last'") and "first" not in msgs[0], msgs[0]
    assert msgs[1].startswith("negative_prompt[0] is longer than the 14 tokens"), msgs[1]
    assert msgs[1].endswith(" grainy'") and "blurry" not in msgs[1], msgs[1]


def test_tokens_beyond_the_text_encoder_are_refused(sd):
    small = sd.replace(text_config=dataclasses.replace(sd.text_config, vocab_size=100))
    with pytest.raises(ValueError, match="token id .* beyond the text encoder's vocab_size 100"):
        generate(small, ["a cat"], num_steps=2, seed=0)
