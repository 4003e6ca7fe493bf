"""Inpainting (jaxdiff.pipelines.inpaint): the mask's preprocessing against diffusers'
``VaeImageProcessor`` (``do_binarize``, ``do_convert_grayscale``) and ``interpolate`` to the latent
grid, the blending levels against the diffusers schedulers' ``add_noise`` at the next timestep,
the bad inputs (one error each), and through :func:`~jaxdiff.pipelines.generate` on tiny folders:
a new mask compiles nothing, the command line's ``--mask``. Parity with diffusers' inpainting
pipelines is in tests/parity/test_inpaint_parity.py."""

from __future__ import annotations

import logging
import types

import numpy as np
import pytest

import jax
import jax.numpy as jnp

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from experiments import text_to_image  # noqa: E402
from experiments.cli import ConfigError  # noqa: E402
from jaxdiff.pipelines.inpaint import (  # noqa: E402
    blend_levels,
    inpaint_mode,
    mask_to_latent_grid,
    prepare_mask,
)
from jaxdiff.samplers import get_sampler  # noqa: E402
from jaxdiff.schedules import make_schedule  # noqa: E402
from jaxdiff.convert.diffusers_scheduler import (  # noqa: E402
    sampler_from_diffusers_config,
    schedule_from_diffusers_config,
)

SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                num_train_timesteps=1000)


def _diffusers_mask(mask, height, width):
    """diffusers' inpainting mask processor on an NHWC numpy mask -> NHWC numpy."""
    from diffusers.image_processor import VaeImageProcessor
    proc = VaeImageProcessor(vae_scale_factor=8, do_normalize=False, do_binarize=True,
                             do_convert_grayscale=True)
    return proc.preprocess(mask, height=height, width=width).numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("shape,size", [
    ((1, 40, 24, 1), (40, 24)),    # same size
    ((1, 20, 28, 1), (16, 24)),    # downscaled (nearest)
    ((2, 12, 12, 1), (32, 24)),    # a batch, upscaled (nearest; not an exact 2x)
    ((1, 16, 16, 1), (32, 32)),    # exact 2x
])
def test_mask_preprocessing_matches_diffusers(shape, size):
    rng = np.random.default_rng(0)
    mask = rng.uniform(0, 1, shape).astype(np.float32)
    mask[..., :2, :] = 0.5  # the threshold itself repaints (>= 0.5), as diffusers' binarize
    ours = prepare_mask(mask, shape[1:3], *size, batch=shape[0])
    ref = _diffusers_mask(mask, *size)
    np.testing.assert_array_equal(ours, ref)
    assert set(np.unique(ours)) <= {0.0, 1.0} and ours.dtype == np.float32
    # ... and to the latent grid as diffusers' prepare_mask_latents (interpolate, nearest)
    h, w = size[0] // 8, size[1] // 8
    lat = np.asarray(jax.jit(mask_to_latent_grid, static_argnums=(1, 2))(ours, h, w))
    ref_lat = torch.nn.functional.interpolate(torch.from_numpy(ref.transpose(0, 3, 1, 2)),
                                              size=(h, w)).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(lat, ref_lat)


def test_mask_forms_dtypes_and_batch():
    m = np.zeros((16, 16), np.uint8)
    m[4:8, 2:9] = 255
    want = (m[None, ..., None] > 0).astype(np.float32)
    for form in (m, m[..., None], m[None, ..., None], m > 0, m.astype(np.float32) / 255):
        np.testing.assert_array_equal(prepare_mask(form, (16, 16), 16, 16, 1), want)
    two = prepare_mask(m, (16, 16), 16, 16, batch=3)  # one mask repeated over the batch
    assert two.shape == (3, 16, 16, 1) and (two == want).all()


@pytest.mark.parametrize("mask,match", [
    (np.zeros((16, 16, 3)), "mask_image must be single-channel.*got shape \\(16, 16, 3\\)"),
    (np.zeros((2, 16, 16, 3)), "single-channel"),
    (np.zeros((16,)), "single-channel"),
    (np.zeros((16, 24)), "mask_image is 16x24 .* but image is 16x16"),
    (np.zeros((3, 16, 16, 1)), "mask_image has batch 3 for 2 images"),
    (np.full((16, 16), 255.0), "mask_image: a float image must lie in \\[0, 1\\]"),
    (np.zeros((16, 16), np.int32), "mask_image must be uint8"),
])
def test_bad_masks_are_refused(mask, match):
    with pytest.raises(ValueError, match=match):
        prepare_mask(mask, (16, 16), 16, 16, batch=2)


def test_inpaint_mode_and_its_errors():
    vae = types.SimpleNamespace(latent_channels=4)
    unet4, unet9, unet5 = (types.SimpleNamespace(in_channels=c) for c in (4, 9, 5))
    ddim, heun = get_sampler("ddim"), get_sampler("heun")
    img, m = np.zeros((8, 8, 3)), np.zeros((8, 8))
    assert inpaint_mode(unet4, vae, mask=None, image=img, sampler=heun) is None  # img2img
    assert inpaint_mode(unet4, vae, mask=m, image=img, sampler=ddim) == "blend"
    assert inpaint_mode(unet9, vae, mask=m, image=img, sampler=heun) == "concat"
    with pytest.raises(ValueError, match="inpainting UNet \\(in_channels 9.*give image and "
                       "mask_image"):
        inpaint_mode(unet9, vae, mask=None, image=img, sampler=ddim)
    with pytest.raises(ValueError, match="mask_image given without image"):
        inpaint_mode(unet4, vae, mask=m, image=None, sampler=ddim)
    with pytest.raises(ValueError, match="UNet has 5 input channels; inpainting needs 4"):
        inpaint_mode(unet5, vae, mask=m, image=img, sampler=ddim)
    with pytest.raises(ValueError, match="sampler 'heun' cannot run 4-channel inpainting"):
        inpaint_mode(unet4, vae, mask=m, image=img, sampler=heun)
    with pytest.raises(ValueError, match="denoising_start / denoising_end with mask_image"):
        inpaint_mode(unet9, vae, mask=m, image=img, sampler=ddim, split=(0.5, None))
    with pytest.raises(ValueError, match="does not take after_step"):
        heun(lambda x, t: x, make_schedule("linear", 10), np.zeros((1, 2)), num_steps=2,
            after_step=lambda x, i: x)


@pytest.mark.parametrize("name,extra", [
    ("DDIMScheduler", dict(steps_offset=1, set_alpha_to_one=False, clip_sample=False)),
    ("PNDMScheduler", dict(skip_prk_steps=True, steps_offset=1)),
    ("EulerDiscreteScheduler", dict(timestep_spacing="leading", steps_offset=1)),
])
def test_blend_levels_are_add_noise_at_the_next_timestep(name, extra):
    """After step ``i`` diffusers blends ``scheduler.add_noise(x0, noise, timesteps[i + 1])``
    (with ``set_begin_index``, as its inpainting pipelines), the clean latents after the last."""
    sched = getattr(diffusers, name)(**SD_BETAS, **extra)
    sched.set_timesteps(5)
    if hasattr(type(sched), "set_begin_index"):  # the sigma-space schedulers
        sched.set_begin_index(0)
    config = {**dict(sched.config), "_class_name": name}
    sampler = sampler_from_diffusers_config(config)
    a, b = blend_levels(sampler, schedule_from_diffusers_config(config), 5)
    ts = sched.timesteps
    assert len(a) == len(ts)
    x0, noise = torch.ones(1, 1), torch.full((1, 1), 2.0)
    for i in range(len(ts) - 1):
        if hasattr(type(sched), "set_begin_index"):
            sched._step_index = i + 1  # where the pipeline's add_noise reads it after step i
        ref = float(sched.add_noise(x0, noise, ts[i + 1:i + 2]))
        np.testing.assert_allclose(a[i] + 2 * b[i], ref, rtol=1e-6, err_msg=f"{name} step {i}")
    assert (a[-1], b[-1]) == (1.0, 0.0)


BLEND_CASES = [
    ("DDIMScheduler", dict(clip_sample=False, set_alpha_to_one=False, steps_offset=1)),
    ("PNDMScheduler", dict(skip_prk_steps=True, steps_offset=1)),    # PLMS
    ("PNDMScheduler", dict(steps_offset=1)),                         # F-PNDM (Runge-Kutta)
    ("EulerDiscreteScheduler", dict(timestep_spacing="leading", steps_offset=1)),
    ("DPMSolverMultistepScheduler", dict()),
    ("UniPCMultistepScheduler", dict()),
    ("LMSDiscreteScheduler", dict()),
    ("DEISMultistepScheduler", dict()),
]


@pytest.mark.parametrize("cls,extra,strength", [  # strength 1 (from noise) where the start
    *[(c, e, 1.0) for c, e in BLEND_CASES[:4] + BLEND_CASES[6:7]],  # scaling differs
    *[(c, e, 0.6) for c, e in BLEND_CASES]])
def test_after_step_blending_matches_diffusers_inpainting_loop(cls, extra, strength):
    """Every sampler that declares ``after_step``, blended as diffusers' inpainting pipelines do
    (their loop written out with the scheduler: ``get_timesteps``, ``set_begin_index``, the
    start from noise at strength 1 or ``add_noise`` below, then after each ``step`` the known
    region ``add_noise(x0, noise, timesteps[i + 1])``, ``x0`` after the last), on the linear toy
    model of tests/parity/test_img2img_sampler_parity.py plus a spatial mean (so that the
    repainted region sees the known one, as a UNet does), with that file's tolerance."""
    from jaxdiff.pipelines.inpaint import InpaintInputs, blend_after_step
    from jaxdiff.samplers import noise_to_img2img
    from tests.parity.test_img2img_sampler_parity import _result_atol, _toy

    def toy(x, t):  # NHWC
        return _toy(x, t) + 0.2 * x.mean((1, 2), keepdims=True)

    n = 6
    sched_t = getattr(diffusers, cls)(**SD_BETAS, **extra)
    config = {**dict(sched_t.config), "_class_name": cls}
    sampler = sampler_from_diffusers_config(config)
    assert sampler.spec.after_step, cls
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((2, 4, 4, 3)).astype(np.float32)
    noise = rng.standard_normal(x0.shape).astype(np.float32)
    mask = (rng.uniform(size=(2, 4, 4, 1)) > 0.5).astype(np.float32)
    sched_t.set_timesteps(n)
    t_start = n - min(int(n * strength), n)
    timesteps = sched_t.timesteps[t_start * sched_t.order:]
    if hasattr(sched_t, "set_begin_index"):
        sched_t.set_begin_index(t_start * sched_t.order)
    x0_t, noise_t, mask_t = (torch.from_numpy(a.transpose(0, 3, 1, 2).copy())
                             for a in (x0, noise, mask))
    lat = (noise_t * sched_t.init_noise_sigma if strength == 1.0
           else sched_t.add_noise(x0_t, noise_t, timesteps[:1].repeat(2)))
    for i, t in enumerate(timesteps):
        inp = sched_t.scale_model_input(lat, t)
        out = 0.3 * inp + 0.001 * float(t) + 0.2 * inp.mean((2, 3), keepdim=True)  # NCHW
        lat = sched_t.step(out, t, lat).prev_sample
        known = x0_t if i == len(timesteps) - 1 else sched_t.add_noise(
            x0_t, noise_t, timesteps[i + 1:i + 2])
        lat = (1 - mask_t) * known + mask_t * lat
    ref = lat.numpy().transpose(0, 2, 3, 1)

    schedule = schedule_from_diffusers_config(config)
    x_T = noise if strength == 1.0 else noise_to_img2img(sampler, schedule, n, x0, noise,
                                                         strength)
    inputs = InpaintInputs(jnp.asarray(mask), None, jnp.asarray(x0), jnp.asarray(noise))
    got = sampler(toy, schedule, jnp.asarray(x_T), None, num_steps=n, strength=strength,
                  after_step=blend_after_step(*blend_levels(sampler, schedule, n), inputs))
    np.testing.assert_allclose(np.asarray(got), ref, rtol=0, atol=_result_atol(
        timesteps.numpy(), len(timesteps), x0, noise, ref))
    known = np.broadcast_to(mask == 0, ref.shape)
    np.testing.assert_allclose(np.asarray(got)[known], x0[known], rtol=0, atol=1e-6)


# -- through generate, on tiny folders (slow: writing and compiling them)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from jaxdiff.pipelines.tiny import write_tiny_stable_diffusion
    out = {}
    for name, opts in (("sd4", {}), ("sd9", {"in_channels": 9})):
        path = str(tmp_path_factory.mktemp(name))
        write_tiny_stable_diffusion(path, seed=1, unet_options=opts)
        out[name] = path
    return out


@pytest.mark.slow
def test_generate_a_new_mask_compiles_nothing_and_the_errors(folders, caplog):
    from jaxdiff.pipelines import PROGRAM_CACHE, generate, load_stable_diffusion
    sd4, sd9 = (load_stable_diffusion(folders[k]) for k in ("sd4", "sd9"))
    image = np.random.default_rng(0).uniform(0, 1, (32, 32, 3)).astype(np.float32)
    m1, m2 = np.zeros((32, 32), np.float32), np.zeros((32, 32), np.float32)
    m1[:16], m2[:, 8:] = 1, 1
    PROGRAM_CACHE.clear()
    outs, counts = [], []
    for sd, mask in ((sd4, m1), (sd4, m2)):  # (the command line's test reuses this program)
        caplog.clear()
        with caplog.at_level(logging.WARNING), jax.log_compiles():
            outs.append(generate(sd, "a cat", image=image, mask_image=mask, strength=1.0,
                                 num_steps=2, seed=0).float_images)
        counts.append(sum("_sd_program" in r.getMessage() and "Compiling" in r.getMessage()
                          for r in caplog.records))
    assert counts == [1, 0], counts
    assert not np.array_equal(outs[0], outs[1])  # the mask is an input
    with pytest.raises(ValueError, match="inpainting UNet .* give image and mask_image"):
        generate(sd9, "a cat", num_steps=2, seed=0)
    with pytest.raises(ValueError, match="sampler 'heun' cannot run 4-channel"):
        generate(sd4, "a cat", image=image, mask_image=m1, num_steps=2, seed=0,
                 sampler="heun")
    with pytest.raises(ValueError, match="mask_image is 16x16 .* but image is 32x32"):
        generate(sd4, "a cat", image=image, mask_image=m1[:16, :16], num_steps=2, seed=0)
    with pytest.raises(ValueError, match="controlnet with image .*inpainting.* not supported"):
        generate(sd4, "a cat", image=image, mask_image=m1, num_steps=2, seed=0,
                 controlnet=object())


@pytest.mark.slow
def test_command_line_mask(folders, tmp_path, capsys):
    from PIL import Image
    src, mask, small = (str(tmp_path / n) for n in ("src.png", "mask.png", "small.png"))
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(src)
    m = np.zeros((32, 32, 3), np.uint8)
    m[8:24, 8:24] = 255  # an RGB mask file: converted to grayscale as diffusers does
    Image.fromarray(m).save(mask)
    Image.fromarray(m[:16, :16]).save(small)
    out = str(tmp_path / "out.png")
    images = text_to_image.main(["--model", folders["sd4"], "--prompt", "a cat", "--steps", "2",
                                 "--init_image", src, "--mask", mask, "--strength", "1",
                                 "--seed", "0", "--out", out])
    assert images.shape == (1, 32, 32, 3)
    with pytest.raises(ConfigError, match="--mask needs --init_image"):
        text_to_image.main(["--model", folders["sd4"], "--prompt", "x", "--mask", mask])
    with pytest.raises(SystemExit) as e:
        text_to_image.cli_main(["--model", folders["sd4"], "--prompt", "x", "--init_image", src,
                                "--mask", small, "--steps", "2"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --mask") and "16x16" in err and len(err.splitlines()) == 1
    with pytest.raises(ConfigError, match="inpainting UNet"):
        text_to_image.main(["--model", folders["sd9"], "--prompt", "x", "--steps", "2",
                            "--init_image", src])
