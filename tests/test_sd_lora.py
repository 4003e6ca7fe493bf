"""LoRAs in the Stable Diffusion pipeline (jaxdiff.pipelines.lora) on a tiny random folder:
unfused LoRAs are merged inside the one generation program with traced scales (a new scale
traces nothing), scale 0 is the base model, fused equals unfused, several LoRAs add with their
weights, export refuses unfused LoRAs, and the command line's ``--lora`` / ``--fuse_lora``.
Parity with diffusers is in tests/parity/test_lora_parity.py."""

from __future__ import annotations

import numpy as np
import pytest

import jax
from jax._src import dispatch

pytest.importorskip("torch")
pytest.importorskip("diffusers")

import jaxdiff.pipelines  # noqa: E402
from experiments import text_to_image  # noqa: E402
from jaxdiff.convert import save_lora  # noqa: E402
from jaxdiff.lora import TEXT_ATTENTION, UNET_ATTENTION, init_lora  # noqa: E402
from jaxdiff.pipelines import (  # noqa: E402
    export_stable_diffusion,
    fuse_lora,
    generate,
    load_lora,
    load_stable_diffusion,
    set_lora_scales,
    unload_loras,
)
from jaxdiff.pipelines.tiny import write_tiny_stable_diffusion  # noqa: E402

pytestmark = pytest.mark.slow  # > 1.5 s a test on 2 cores (compiles a generation program)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny_sd_lora") / "sd")
    write_tiny_stable_diffusion(path)
    return path


@pytest.fixture(scope="module")
def sd(folder):
    return load_stable_diffusion(folder)


def _random_lora(sd, seed, text=True):
    """An adapter with random (not zero) up weights, so that it changes the image."""
    key = jax.random.key(seed)
    lora = {"unet": init_lora(sd.params["unet"], UNET_ATTENTION, rank=2, key=key)}
    if text:
        lora["text_encoder"] = init_lora(sd.params["text_encoder"], TEXT_ATTENTION, rank=2,
                                         key=key)
    return jax.tree.map(lambda x: x + 0.2 * jax.random.normal(jax.random.fold_in(key, x.size),
                                                               x.shape), lora)


@pytest.fixture(scope="module")
def loras(sd, tmp_path_factory):
    a, b = _random_lora(sd, 0), _random_lora(sd, 1, text=False)
    folder = tmp_path_factory.mktemp("loras")
    return a, b, save_lora(folder / "a.safetensors", a), save_lora(folder / "b", b)


def _run(sd):
    return generate(sd, ["a cat", "a dog"], num_steps=2, seed=0).float_images


class _Traces:
    """The ``_sd_program`` traces while entered (JAX's monitoring events)."""

    def __init__(self):
        self.count = 0

    def _listen(self, event, duration, **kw):
        if event == dispatch.JAXPR_TRACE_EVENT and kw.get("fun_name") == "_sd_program":
            self.count += 1

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._listen)


def test_unfused_scales_are_traced(sd, loras):
    _, _, file_a, _ = loras
    base = _run(sd)
    with _Traces() as first:
        one = _run(load_lora(sd, file_a, 1.0))
    with _Traces() as again:
        half = _run(load_lora(sd, file_a, 0.5))  # a new scale, a newly read adapter
        zero = _run(set_lora_scales(load_lora(sd, file_a), [0.0]))
    assert first.count == 1 and again.count == 0, (first.count, again.count)
    assert np.abs(one - base).max() > 0.02 and np.abs(half - one).max() > 0.01
    np.testing.assert_allclose(zero, base, atol=1e-6)  # W + 0 * delta is W


def test_fused_equals_unfused_and_loras_add(sd, loras):
    a, b, file_a, file_b = loras
    both = load_lora(load_lora(sd, file_a, 0.7), file_b, -0.4)
    assert len(both.loras) == 2 and float(both.loras[1][1]) == np.float32(-0.4)
    unfused = _run(both)
    fused_all = fuse_lora(both)
    assert fused_all.loras == ()
    np.testing.assert_allclose(_run(fused_all), unfused, atol=1e-5)
    step_by_step = fuse_lora(fuse_lora(sd, a, 0.7), file_b, -0.4)  # an adapter, then a file
    np.testing.assert_allclose(_run(step_by_step), unfused, atol=1e-5)
    assert not np.allclose(_run(load_lora(sd, file_a, 0.7)), unfused, atol=1e-3)  # b counts
    np.testing.assert_allclose(_run(unload_loras(both)), _run(sd), atol=0)


def test_errors(sd, loras, tmp_path):
    a, _, file_a, _ = loras
    with pytest.raises(ValueError, match="scale must be a finite number"):
        load_lora(sd, file_a, float("inf"))
    with pytest.raises(ValueError, match="one entry per loaded LoRA"):
        set_lora_scales(load_lora(sd, file_a), [1.0, 2.0])
    with pytest.raises(ValueError, match=r"lora\['unet'\]: .*does not make the kernel"):
        load_lora(sd, {"unet": jax.tree.map(lambda x: x[..., :1], a["unet"])})
    with pytest.raises(ValueError, match="unfused LoRA.*fuse_lora"):
        export_stable_diffusion(load_lora(sd, a), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def _error(capsys, argv):
    with pytest.raises(SystemExit) as e:
        text_to_image.cli_main(argv)
    assert e.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_command_line(folder, loras, tmp_path, capsys, monkeypatch):
    _, _, file_a, file_b = loras
    base = ["--model", folder, "--prompt", "a cat", "--steps", "2", "--guidance_scale", "1"]
    plain = text_to_image.main(base + ["--out", str(tmp_path / "a.png")])
    with_lora = text_to_image.main(base + ["--lora", f"{file_a}:0.8", "--lora", file_b,
                                           "--out", str(tmp_path / "b.png")])
    fused = text_to_image.main(base + ["--lora", f"{file_a}:0.8", "--lora", file_b,
                                       "--fuse_lora", "--out", str(tmp_path / "c.png")])
    assert np.abs(with_lora.astype(int) - plain).max() > 5
    assert np.abs(with_lora.astype(int) - fused).max() <= 1
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    assert "bad.safetensors" in _error(capsys, base + ["--lora", str(bad)])

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the error")

    monkeypatch.setattr(jaxdiff.pipelines, "load_stable_diffusion", refuse)
    assert "no such file or folder" in _error(capsys, base + ["--lora", "nope.safetensors:2"])
    assert "--fuse_lora needs --lora" in _error(capsys, base + ["--fuse_lora"])
