"""The README's quickstart runs as written on a fresh clone: its Python block and its
``python -m experiments.*`` command lines, from an empty working directory. Two stand-ins keep it
offline and short, and nothing else is changed: a tiny random Stable Diffusion folder written by
diffusers (:func:`jaxdiff.pipelines.tiny.write_tiny_stable_diffusion`) takes the place of the
checkpoint path, and ``train_mnist``, when the README names no config, gets the smoke config
(``experiments/configs/mnist_smoke.py``) instead of the 9-minute default, on generated IDX files.
Every relative link of the README points at a file of the repository.

The docs pages' snippets (the tour) run in ``tests/test_docs.py``."""

import importlib
import pathlib
import re
import shlex

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
README = REPO / "README.md"
# The checkpoint folder of the quickstart; the tests put the tiny folder in its place.
PLACEHOLDER = "path/to/stable-diffusion"
SMOKE = REPO / "experiments" / "configs" / "mnist_smoke.py"
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s#]+)[^)]*\)")


def quickstart() -> str:
    """The README's "## Quickstart" section, up to the next second-level heading."""
    text = README.read_text()
    m = re.search(r"^## Quickstart\n(.*?)(?=^## )", text, flags=re.S | re.M)
    assert m, "the README lost its Quickstart section"
    return m.group(1)


def blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.S | re.M)


def commands(text: str) -> list[list[str]]:
    """The ``python -m experiments.X ...`` lines of the bash blocks, as argv lists (line
    continuations joined, comments dropped)."""
    out = []
    for block in blocks(text, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if argv[:2] == ["python", "-m"] and argv[2].startswith("experiments."):
                out.append(argv[2:])
    return out


def prose_links(text: str) -> list[str]:
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return [t for t in LINK.findall(prose) if not re.match(r"^[a-z][a-z0-9+.-]*:|^/", t)]


def test_readme_links_point_at_files():
    links = prose_links(README.read_text())
    assert any(t.startswith("docs/") for t in links), "the README no longer links the docs"
    missing = [t for t in links if not (README.parent / t).exists()]
    assert not missing, f"README links to missing files: {missing}"


def test_quickstart_names_what_a_new_user_needs():
    """The issue's list: install, an image from a diffusers folder (command and Python), train
    and sample MNIST with ``training.num_steps`` and the smoke config named, the override order,
    the tests (CI's exact command and the fast tier), and a picture."""
    text = quickstart()
    progs = [argv[0] for argv in commands(text)]
    assert progs == ["experiments.text_to_image", "experiments.finetune_sd",
                     "experiments.text_to_image", "experiments.train_mnist",
                     "experiments.sample"], progs
    assert "--lora" in text and "metadata.jsonl" in text
    assert "pip install -e ." in text
    assert len(blocks(text, "python")) == 1
    for needle in ("--config.training.num_steps=", "--config=experiments/configs/mnist_smoke.py",
                   "must come before", 'python -m pytest -n 2 -m "not slow" tests', "!["):
        assert needle in text, needle
    ci = (REPO / ".ci" / "run").read_text()
    test_lines = [line.split("#")[0].strip() for line in ci.splitlines()
                  if line.startswith("python -m pytest")]
    assert test_lines == ["python -m pytest -n 2 tests"], test_lines
    assert "python -m pytest -n 2 tests" in text, "the README's test command is not CI's"
    assert SMOKE.is_file()


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory) -> str:
    pytest.importorskip("diffusers", reason="the tiny SD folder is written by diffusers (the "
                        "test extra)")
    from jaxdiff.pipelines.tiny import write_tiny_stable_diffusion

    path = str(tmp_path_factory.mktemp("tiny_sd"))
    write_tiny_stable_diffusion(path)
    return path


@pytest.mark.slow
def test_quickstart_commands_run(tiny_sd, tmp_path, monkeypatch):
    from tests.test_data import write_fake_mnist

    write_fake_mnist(str(tmp_path / "mnist"), n_train=32, n_test=8)
    monkeypatch.setenv("JAXDIFF_MNIST_DIR", str(tmp_path / "mnist"))
    work = tmp_path / "clone"
    (work / "my_images").mkdir(parents=True)
    from PIL import Image

    for i, caption in enumerate(["a red square", "a blue square"]):   # the user's image folder
        Image.fromarray(np.full((40, 40, 3), 60 * i + 40, np.uint8)).save(
            work / "my_images" / f"{i}.png")
        (work / "my_images" / f"{i}.txt").write_text(caption)
    monkeypatch.chdir(work)
    for argv in commands(quickstart()):
        module, args = argv[0], [a.replace(PLACEHOLDER, tiny_sd) for a in argv[1:]]
        if module == "experiments.train_mnist" and not any(a.startswith("--config=")
                                                           for a in args):
            args.append(f"--config={SMOKE}")
        if module == "experiments.finetune_sd":   # a few steps of the default LoRA
            args += ["--config.training.num_steps=2", "--config.validation.every=0"]
        importlib.import_module(module).cli_main(args)  # what `python -m` runs; exit 2 raises
    assert (work / "cat.png").is_file() and (work / "out.png").is_file()
    assert (work / "runs" / "my_lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (work / "runs" / "mnist" / "checkpoints").is_dir()
    samples = np.load(work / "samples.npz")
    assert samples["images"].shape == (64, 28, 28, 1) and (work / "samples.png").is_file()
    assert np.isfinite(samples["images"]).all()


@pytest.mark.slow
def test_quickstart_python_runs(tiny_sd, tmp_path, monkeypatch):
    (block,) = blocks(quickstart(), "python")
    assert block.count(PLACEHOLDER) == 1, block
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(block.replace(PLACEHOLDER, tiny_sd), "README.md[quickstart]", "exec"), namespace)
    images = namespace["out"].images
    assert images.shape == (1, 32, 32, 3) and images.dtype == np.uint8
    assert (tmp_path / "cat.png").is_file()
