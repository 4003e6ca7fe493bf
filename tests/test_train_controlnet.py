"""Training a ControlNet (jaxdiff.finetune.controlnet, jaxdiff.data.controlnet_folder,
experiments.train_controlnet): the pairs folder and its errors, and on a tiny random Stable
Diffusion folder (written by diffusers) what trains and what stays frozen, exact resume, the
refusal of another mode's workdir, the export (read back by load_controlnet) and the command
line's one-line errors."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from experiments.cli import ConfigError
from jaxdiff.data import load_conditioning_images, read_controlnet_folder
from jaxdiff.finetune import (FinetuneConfig, build_controlnet_task, build_finetune_task,
                              conditioning_widths, new_controlnet)
from jaxdiff.sharding import make_mesh
from jaxdiff.training import (Checkpointer, IncompatibleCheckpointError, OptimizerConfig,
                              TrainerSettings, abstract_train_state, fit, make_optimizer)
from jaxdiff.validation import InvalidFileError

OPT = OptimizerConfig(learning_rate=3e-3, warmup_steps=0, schedule="constant")


def _pairs(folder, n=4, size=32, cond_size=None, seed=0):
    """A pairs folder: ``i.png`` (RGB noise), ``cond/i.png`` (its thresholded copy)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, "cond"), exist_ok=True)
    with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
        for i in range(n):
            img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(img).save(os.path.join(folder, f"{i}.png"))
            cs = cond_size or size
            cond = (img[:cs, :cs].mean(-1) > 127).astype(np.uint8) * 255
            Image.fromarray(cond).save(os.path.join(folder, "cond", f"{i}.png"))
            f.write(json.dumps({"file_name": f"{i}.png", "text": ["a cat", "a dog"][i % 2],
                                "conditioning_image": f"cond/{i}.png"}) + "\n")
    return str(folder)


def test_pairs_folder_reads_pairs_and_names_bad_ones(tmp_path):
    folder = read_controlnet_folder(_pairs(tmp_path / "ok", n=3))
    assert len(folder) == 3 and folder.images.captions == ("a cat", "a dog", "a cat")
    assert [os.path.basename(p) for p in folder.conditioning] == ["0.png", "1.png", "2.png"]
    cond = load_conditioning_images(folder, 16, channels=1)
    assert cond.shape == (3, 16, 16, 1) and cond.min() >= 0 and cond.max() <= 1
    assert set(np.unique(np.round(load_conditioning_images(folder, 32), 3))) <= {0.0, 1.0}
    # a control image that is missing, one of another size, a line without the column
    bad = _pairs(tmp_path / "missing", n=2)
    os.remove(os.path.join(bad, "cond", "1.png"))
    with pytest.raises(InvalidFileError, match=r"line 2: the control image "
                                               r"conditioning_image='cond/1.png' is not a file"):
        read_controlnet_folder(bad)
    with pytest.raises(InvalidFileError, match=r"line 1: the control image cond/0.png is 24x24 "
                                               r"but its image 0.png is 32x32"):
        read_controlnet_folder(_pairs(tmp_path / "sizes", n=1, cond_size=24))
    with pytest.raises(InvalidFileError, match="no control image column 'hint'"):
        read_controlnet_folder(_pairs(tmp_path / "col", n=1), conditioning_column="hint")
    with pytest.raises(ValueError, match="no metadata.jsonl"):
        read_controlnet_folder(tmp_path / "col" / "cond")
    assert conditioning_widths(8) == (16, 32, 96, 256)
    assert conditioning_widths(4) == (16, 32, 96) and conditioning_widths(16)[-1] == 512
    with pytest.raises(ValueError, match="power of two"):
        conditioning_widths(6)
    with pytest.raises(ValueError, match="train_text_encoder"):
        FinetuneConfig(mode="controlnet", train_text_encoder=True)


# -- on a tiny Stable Diffusion ----------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pytest.importorskip("diffusers")
    from jaxdiff.pipelines import load_stable_diffusion
    from jaxdiff.pipelines.tiny import write_tiny_stable_diffusion

    path = str(tmp_path_factory.mktemp("cn") / "tiny-sd")
    write_tiny_stable_diffusion(path)
    return path, load_stable_diffusion(path)


def _examples(sd, n=4, channels=3, seed=0):
    rng = np.random.default_rng(seed)
    ids = sd.tokenizer(["a cat", "a dog"] * (n // 2), padding="max_length",
                       truncation=True).input_ids
    images = rng.uniform(-1, 1, (n, 32, 32, 3)).astype(np.float32)
    return {"pixel_values": images, "input_ids": np.asarray(ids, np.int32),
            "conditioning_pixel_values": (images[..., :channels] > 0).astype(np.float32)}


def _settings(workdir, steps):
    return TrainerSettings(workdir=str(workdir), num_steps=steps, batch_size=2, log_every=1,
                           checkpoint_every=2, progress=False, optimizer=OPT)


def _restore(workdir, task):
    tx, _ = make_optimizer(OPT)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), None, read_only=True)
    try:
        return ckpt.restore_latest(abstract_train_state(task.init_params(True), tx, task.key,
                                                        make_mesh()))[0]
    finally:
        ckpt.close()


@pytest.mark.slow
def test_only_the_controlnet_trains_and_resume_is_exact(tiny, tmp_path):
    _, sd = tiny
    cfg = FinetuneConfig(mode="controlnet", cache=True)
    start = new_controlnet(sd, jax.random.key(0))
    frozen_before = jax.tree.map(np.array, sd.params)
    ex = _examples(sd)

    def task():
        return build_controlnet_task(sd, cfg, start, ex, batch_size=2, seed=0)

    fit(_settings(tmp_path / "whole", 4), task())
    fit(_settings(tmp_path / "cut", 2), task())
    assert fit(_settings(tmp_path / "cut", 4), task())["start_step"] == 2
    a, b = _restore(str(tmp_path / "whole"), task()), _restore(str(tmp_path / "cut"), task())
    for u, v in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_array_equal(u, v)
    # trainable: the ControlNet alone, every zero convolution moved off zero
    assert set(a.params) == {"controlnet"}
    assert np.any(np.asarray(a.params["controlnet"]["controlnet_mid_block"]["kernel"]) != 0)
    assert np.any(np.asarray(a.params["controlnet"]["controlnet_cond_embedding"]["conv_out"]
                             ["kernel"]) != 0)
    # optimizer state: AdamW's two moments of exactly the ControlNet's params, nothing else
    n_params = sum(x.size for x in jax.tree.leaves(a.params))
    n_state = sum(x.size for x in jax.tree.leaves(a.opt_state) if np.ndim(x) > 0)
    assert n_state == 2 * n_params
    # the frozen model is untouched (UNet, VAE, text encoder)
    for u, v in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(sd.params)):
        np.testing.assert_array_equal(u, np.asarray(v))
    # a LoRA fine-tuning of the same model in this workdir: refused before anything is written
    lora = build_finetune_task(sd, FinetuneConfig(mode="lora", rank=2, cache=True),
                               {k: ex[k] for k in ("pixel_values", "input_ids")},
                               batch_size=2, seed=0)
    before = sorted(os.listdir(tmp_path / "cut"))
    with pytest.raises(IncompatibleCheckpointError, match="different config"):
        fit(_settings(tmp_path / "cut", 6), lora)
    assert sorted(os.listdir(tmp_path / "cut")) == before


def test_task_refuses_examples_that_do_not_fit(tiny):
    _, sd = tiny
    cfg = FinetuneConfig(mode="controlnet")
    start = new_controlnet(sd, jax.random.key(0))
    ex = _examples(sd, channels=1)
    with pytest.raises(ValueError, match=r"conditioning_pixel_values'\] must be \[4, 32, 32, 3\]"):
        build_controlnet_task(sd, cfg, start, ex, batch_size=2, seed=0)
    ex = dict(_examples(sd), conditioning_pixel_values=np.zeros((4, 16, 16, 3), np.float32))
    with pytest.raises(ValueError, match=r"must be \[4, 32, 32, 3\]"):
        build_controlnet_task(sd, cfg, start, ex, batch_size=2, seed=0)
    with pytest.raises(ValueError, match="mode='controlnet'"):
        build_controlnet_task(sd, FinetuneConfig(mode="lora"), start, _examples(sd),
                              batch_size=2, seed=0)


@pytest.mark.slow
def test_cli_trains_exports_and_refuses(tiny, tmp_path, capsys):
    from experiments import controlnet_lib, train_controlnet
    from jaxdiff.pipelines import load_controlnet

    model, sd = tiny
    data = _pairs(tmp_path / "pairs")
    work = str(tmp_path / "run")
    args = ["--model", model, "--data", data, "--workdir", work, "--config.training.num_steps=2",
            "--config.training.batch_size=2", "--config.validation.every=0",
            "--config.memory.cache=True", "--config.controlnet.conditioning_channels=1",
            "--config.training.learning_rate=1e-3"]
    summary = train_controlnet.main(args)
    assert summary["end_step"] == 2 and summary["controlnet_dir"] == os.path.join(work,
                                                                                 "controlnet")
    # the export is the checkpoint's ControlNet, read back by load_controlnet
    config, params = load_controlnet(summary["controlnet_dir"])
    assert config.conditioning_channels == 1 and config.downscale == sd.vae_scale_factor
    cn_config, _ = new_controlnet(sd, jax.random.key(0), conditioning_channels=1)
    task = build_controlnet_task(sd, FinetuneConfig(mode="controlnet", cache=True),
                                 (cn_config, params), _examples(sd, channels=1), batch_size=2,
                                 seed=0)
    state = _restore(work, task)
    for u, v in zip(jax.tree.leaves(state.params["controlnet"]), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    import diffusers

    torch_net = diffusers.ControlNetModel.from_pretrained(summary["controlnet_dir"])
    mid = torch_net.controlnet_mid_block.weight.detach().numpy()     # [O, I, 1, 1] (OIHW)
    np.testing.assert_array_equal(mid.transpose(2, 3, 1, 0),
                                  np.asarray(params["controlnet_mid_block"]["kernel"]))
    assert np.any(mid != 0)
    out = controlnet_lib.export_from_workdir(work, str(tmp_path / "again"))
    assert out["step"] == 2
    with open(os.path.join(str(tmp_path / "again"), "diffusion_pytorch_model.safetensors"),
              "rb") as f, open(os.path.join(work, "controlnet",
                                            "diffusion_pytorch_model.safetensors"), "rb") as g:
        assert f.read() == g.read()
    # user errors: one line, exit 2, nothing written
    capsys.readouterr()
    before = sorted(os.listdir(work))
    for extra, fresh, message in (
            (["--config.controlnet.conditioning_channels=3"], False, "different config"),
            (["--config.controlnet.conditioning_channels=2"], False,
             "conditioning_channels must be 1 or 3"),
            ([], True, "line 4: the control image")):
        argv = list(args) + extra
        if fresh:   # a control image gone
            os.remove(os.path.join(data, "cond", "3.png"))
            argv[argv.index("--workdir") + 1] = str(tmp_path / "fresh")
        with pytest.raises(SystemExit) as e:
            train_controlnet.cli_main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err
    assert sorted(os.listdir(work)) == before and not os.path.exists(tmp_path / "fresh")
    with pytest.raises(ConfigError, match="not a train_controlnet run"):
        controlnet_lib.export_from_workdir(str(tmp_path))
