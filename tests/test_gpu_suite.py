"""The GPU suite (benchmarks/gpu_suite.py) works before it meets a GPU: its --smoke run writes
every part's stored output with the expected rows and fields, and the driver stops, skips and
refuses what it should."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from benchmarks import gpu_suite
from benchmarks.gpu_suite_env import PACKAGES, peak_flops

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ("sd_pipeline", "train_mfu", "compile_cache", "cudnn_attention", "finetune")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_suite_out")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_suite", "--smoke", "--out",
                           str(out)], cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "gpu_suite.json") as f:
        summary = json.load(f)
    return out, summary, {p["name"]: p for p in summary["parts"]}


def _rows(parts, name, **match):
    return [r for r in parts[name]["rows"] if all(r.get(k) == v for k, v in match.items())]


@pytest.mark.slow
def test_smoke_writes_every_part(smoke):
    out, summary, parts = smoke
    assert [p["name"] for p in summary["parts"]] == list(PARTS)
    assert all(p["status"] == "ok" for p in summary["parts"]), summary["parts"]
    assert summary["versions"]["jax"] and summary["versions"]["diffusers"]
    for name in PARTS:
        text = (out / f"gpu_suite_{name}.md").read_text()
        assert text.startswith("$ python -m benchmarks.gpu_suite --smoke")
        assert "GPU: " in text and "jax " in text and "status: ok" in text


@pytest.mark.slow
def test_smoke_sd_pipeline_rows(smoke):
    _, _, parts = smoke
    for batch in (1, 2):
        eager = _rows(parts, "sd_pipeline", batch=batch, side="diffusers fp16 eager (SDPA)")
        jax_ = _rows(parts, "sd_pipeline", batch=batch, side="jaxdiff bf16 (one jit)")
        assert len(eager) == 1 and len(jax_) == 1
        assert jax_[0]["ratio_vs_eager"] > 0 and jax_[0]["compile_s"] > 0
        assert jax_[0]["s_per_image"] == pytest.approx(jax_[0]["call_s"] / batch)
        assert _rows(parts, "sd_pipeline", batch=batch,
                     side="diffusers fp16 torch.compile")[0]["skipped"] is True
    check = _rows(parts, "sd_pipeline", kind="image_diff", batch=1)[0]
    # the tolerance: 3x diffusers' own half-precision spread against its float32 run
    assert check["tolerance_max"] == pytest.approx(
        3 * max(check["fp16_vs_fp32_max"], check["bf16_vs_fp32_max"]))
    assert 0 < check["jax_vs_fp32_max"] <= check["tolerance_max"]
    assert check["jax_vs_fp32_mean"] <= check["tolerance_mean"]
    assert check["within_tolerance"] is True
    assert 0 < _rows(parts, "sd_pipeline", kind="image_diff", batch=2)[0]["max_abs"] < 0.25


@pytest.mark.slow
def test_smoke_train_compile_attention_finetune_rows(smoke):
    _, _, parts = smoke
    (train,) = parts["train_mfu"]["rows"]
    assert train["flops_per_step"] > 1e6 and train["steps_per_s"] > 0
    assert train["images_per_s"] == pytest.approx(train["steps_per_s"] * train["batch"])
    assert train["mfu"] is None and train["device_kind"] == "cpu"  # no CPU peak in the table
    compile_rows = {(r["program"], r["mode"]): r for r in parts["compile_cache"]["rows"]}
    assert set(compile_rows) == {(p, m) for p in ("train_step", "sd_program")
                                 for m in ("cold", "warm")}
    for (program, mode), r in compile_rows.items():
        assert r["compile_s"] >= 0 and r["cache_files"] > 0
        assert (r["cold_source"] != "-") == (mode == "cold")
    for program in ("train_step", "sd_program"):  # the warm process found the cold program
        assert compile_rows[(program, "warm")]["cache_files_added"] == 0
    xla, cudnn = parts["cudnn_attention"]["rows"]
    assert xla["implementation"] == "xla" and xla["forward_ms"] > 0
    assert cudnn["skipped"] is True and "CUDA GPU" in cudnn["reason"]
    ft = {r["row"]: r for r in parts["finetune"]["rows"]}
    assert set(ft) == {"lora_remat"}   # smoke: one row
    assert ft["lora_remat"]["trainable"] > 0
    assert all(r["images_per_s"] > 0 and r["xla_temp_bytes"] > 0 for r in ft.values())


def test_peak_flops_table():
    assert peak_flops("NVIDIA H100 80GB HBM3") == (989.4e12, "h100")
    assert peak_flops("NVIDIA H100 PCIe")[1] == "h100 pcie"
    assert peak_flops("cpu") == (None, None)


def test_bad_arguments_are_one_error_line(capsys):
    for argv, message in ((["--parts", "nope"], "error: --parts: unknown ['nope']; choose from "
                           + ", ".join(PARTS)),
                          (["--budget", "0"], "error: --budget must be a positive number of "
                           "seconds, got 0.0")):
        with pytest.raises(SystemExit) as e:
            gpu_suite.main(argv)
        assert e.value.code == 2
        assert capsys.readouterr().err.strip().splitlines() == [message]


def test_missing_package_skips_the_part(tmp_path, monkeypatch):
    versions = {m: "1" for m, _ in PACKAGES}
    versions["diffusers"] = None
    monkeypatch.setattr(gpu_suite, "package_versions", lambda: versions)
    rc = gpu_suite.main(["--parts", "cudnn_attention", "--out", str(tmp_path), "--workdir",
                         str(tmp_path / "work")])
    assert rc == 0
    (part,) = json.loads((tmp_path / "gpu_suite.json").read_text())["parts"]
    assert part["status"] == "skipped" and "diffusers" in part["reason"] and part["rows"] == []
    assert "status: skipped" in (tmp_path / "gpu_suite_cudnn_attention.md").read_text()


def test_a_part_past_its_cap_is_stopped_and_keeps_its_output(tmp_path):
    child = tmp_path / "child.py"
    child.write_text(textwrap.dedent("""
        import subprocess, sys, time
        print("| row | 1 |", flush=True)
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        time.sleep(60)
    """))
    lines = []
    status, rc, secs = gpu_suite.run_process([sys.executable, str(child)], 1.0, lines,
                                             str(tmp_path / "err.txt"))
    assert (status, rc) == ("timeout", None) and secs < 10
    assert lines == ["| row | 1 |"]
