"""Train in JAX, run in PyTorch: a random jaxdiff text-to-image model (1-channel 32x32 images,
3 latent channels, a UNet cross-attending to a small CLIP text encoder; the shapes of
tests/test_export_diffusers.py's ``tiny_parts``) is written with ``save_stable_diffusion``, loaded
by ``diffusers.StableDiffusionPipeline.from_pretrained`` and run in torch from the same initial
latents, 3 DDIM steps (cosine schedule) with classifier-free guidance; its images are compared
with jaxdiff's own ``generate`` on the in-memory params (a :class:`StableDiffusion` built by
hand, not loaded from the folder), float32. The folder carries a ``jaxdiff_generation.json``
(jaxdiff's generation defaults), which diffusers must ignore.

Tolerance: images (in [0, 1]) within ``tolerances.image_atol`` of the latents' bound
``tolerances.pipeline_rtol`` (float32 networks per UNet call, weighted by the guidance).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from jaxdiff.pipelines import (  # noqa: E402
    GENERATION_DEFAULTS_FILE,
    GenerationDefaults,
    StableDiffusion,
    generate,
    save_stable_diffusion,
)
from jaxdiff.samplers import get_sampler  # noqa: E402
from jaxdiff.schedules import make_schedule  # noqa: E402
from tests.parity.tolerances import (  # noqa: E402
    image_atol,
    network_rtol,
    pipeline_rtol,
    timestep_embedding_atol,
    torch_layers,
    within,
)
from tests.test_export_diffusers import tiny_parts  # noqa: E402

pytestmark = pytest.mark.slow  # every test here takes > 1.5 s on 2 cores

PROMPTS = ["a cat", "the dog of a cat"]
NEGATIVES = ["", "a dog"]

# The text-to-MNIST setting: DDIM on the cosine schedule (diffusers' squaredcos_cap_v2), eps;
# steps_offset=1 because StableDiffusionPipeline forces it (save_stable_diffusion checks that).
# Other samplers' configs are checked by tests/test_export_diffusers.py's round trips, and their
# diffusers parity by tests/parity/test_sd_pipeline_parity.py.
SAMPLER = get_sampler("ddim", steps_offset=1)
SCHEDULE = "cosine"


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return tiny_parts(str(tmp_path_factory.mktemp("tok")), seed=11)


def test_exported_folder_runs_in_diffusers_as_in_jaxdiff(parts, tmp_path):
    defaults = GenerationDefaults.from_sampler(SAMPLER, num_steps=3, guidance_scale=5.0,
                                               height=32, width=32, crop=(2, 2, 28, 28))
    path = save_stable_diffusion(str(tmp_path / "sd"), **parts, sampler=SAMPLER,
                                 schedule=SCHEDULE, num_timesteps=1000,
                                 generation_defaults=defaults)
    assert (tmp_path / "sd" / GENERATION_DEFAULTS_FILE).is_file()
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(path)   # ignores the file
    pipe.set_progress_bar_config(disable=True)
    assert pipe.safety_checker is None and type(pipe.scheduler).__name__ == "DDIMScheduler"
    ids = pipe.tokenizer(PROMPTS + NEGATIVES, padding="max_length",
                         max_length=pipe.tokenizer.model_max_length).input_ids
    np.testing.assert_array_equal(np.asarray(ids),
                                  parts["tokenizer"](PROMPTS + NEGATIVES).input_ids)

    lat = np.random.default_rng(0).standard_normal((2, 8, 8, 3)).astype(np.float32)
    ref = pipe(PROMPTS, negative_prompt=NEGATIVES, num_inference_steps=3, guidance_scale=5.0,
               latents=torch.from_numpy(lat.transpose(0, 3, 1, 2).copy()), height=32, width=32,
               output_type="np").images
    assert ref.shape == (2, 32, 32, 1)

    sd = StableDiffusion(
        params={"unet": parts["unet_params"], "vae": parts["vae_params"],
                "text_encoder": parts["text_params"]},
        unet_config=parts["unet_config"], vae_config=parts["vae_config"],
        text_config=parts["text_config"], tokenizer=parts["tokenizer"],
        schedule=make_schedule(SCHEDULE, 1000), sampler=SAMPLER,
        scheduler_config={"_class_name": "in memory"}, sample_size=8)
    out = generate(sd, PROMPTS, NEGATIVES, num_steps=3, guidance_scale=5.0, latents=lat)
    err = float(np.abs(out.float_images - ref).max())
    print(f"export parity: image max err {err:.2e}, image std {ref.std():.3f}")
    assert ref.std() > 0.05  # not a blank image
    # the bound scales with the VAE's unclamped output: decode jaxdiff's final latents for it
    with torch.no_grad():
        dec = pipe.vae.decode(torch.from_numpy(out.latents.transpose(0, 3, 1, 2).copy())
                              / pipe.vae.config.scaling_factor).sample.numpy()
    bound = image_atol(pipe, pipeline_rtol(pipe, 5.0), out.latents, dec)
    within(err, bound, "images")


def test_exported_unet_with_per_level_options_matches_diffusers():
    """``unet_to_diffusers`` on the options a text-to-image UNet may vary per level (heads,
    transformer depth, resnets), with linear projections, a class embedding, a resnet-only mid
    block, another time embedding: ``UNet2DConditionModel(**config)`` takes the state dict
    strictly and gives jaxdiff's output (relative error within the network's float32 bound and
    its timestep features', tests/parity/tolerances.py)."""
    import jax
    import jax.numpy as jnp

    from jaxdiff.convert import unet_to_diffusers
    from jaxdiff.models import UNet, UNetConfig
    from jaxdiff.models.unet import unet_param_shapes
    from tests.test_export_diffusers import random_params

    cfg = UNetConfig(in_channels=2, out_channels=2, block_channels=(8, 16),
                     layers_per_block=(2, 1), attention=("cross", "cross"),
                     up_attention=(None, "cross"), mid_layers=0, mid_attention=None,
                     num_heads=(2, 4), transformer_depth=(2, 1), use_linear_projection=True,
                     context_dim=12, norm_groups=4, num_classes=3, flip_sin_to_cos=False,
                     freq_shift=1.0, time_embed_dim=24)
    params = random_params(unet_param_shapes(cfg), 7)
    state, config = unet_to_diffusers(params, cfg, sample_size=8)
    model = diffusers.UNet2DConditionModel.from_config(
        {k: v for k, v in config.items() if not k.startswith("_")})
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    model.eval()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 6, 5, 2)).astype(np.float32)  # odd width: 5 -> 3 -> 5
    t = np.array([0, 400, 999])
    ctx = rng.standard_normal((3, 5, 12)).astype(np.float32)
    y = np.array([0, 2, 3])  # 3: jaxdiff's null label, diffusers' last class row
    with torch.no_grad():
        ref = model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(t),
                    encoder_hidden_states=torch.from_numpy(ctx),
                    class_labels=torch.from_numpy(y)).sample.numpy().transpose(0, 2, 3, 1)
    out = jax.jit(lambda p: UNet(cfg).apply({"params": p}, jnp.asarray(x), jnp.asarray(t),
                                            labels=jnp.asarray(y), context=jnp.asarray(ctx)))(
        params)
    err = float(np.abs(np.asarray(out) - ref).max() / np.abs(ref).max())
    print(f"exported UNet relative error {err:.2e}")
    within(err, network_rtol(*torch_layers(model)) + timestep_embedding_atol(999), "UNet")
