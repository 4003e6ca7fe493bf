"""Text-to-MNIST latent diffusion: the prompt grammar's split, the CLIP BPE learnt on the prompts
(round trip, one token per training word, transformers loads the same ids), a tiny two-stage
training run (autoencoder, then text encoder + UNet) with an exact resume, the exported diffusers
folder sampled by the text_to_image command line, and one-line config errors."""

import json
import os

import jax
import numpy as np
import pytest

from experiments import mnist_prompts as mp
from tests.test_data import write_fake_mnist

# A tiny run: 8x8x2 latents, a 2-level UNet of 8 / 16 channels, a 1-layer text encoder of width 8.
TINY = ["--config.vae.model.block_channels=(8,8,8)", "--config.vae.model.norm_groups=4",
        "--config.vae.model.latent_channels=2", "--config.vae.training.batch_size=8",
        "--config.vae.training.num_steps=2", "--config.vae.training.log_every=1",
        "--config.vae.eval.batch_size=8", "--config.vae.eval.num_examples=8",
        "--config.model.in_channels=2", "--config.model.out_channels=2",
        "--config.model.block_channels=(8,16)", "--config.model.norm_groups=4",
        "--config.model.num_heads=1", "--config.model.context_dim=8",
        "--config.model.attention=(None,\"cross\")",
        "--config.text.hidden_size=8", "--config.text.intermediate_size=16",
        "--config.text.num_hidden_layers=1", "--config.text.num_attention_heads=2",
        "--config.training.batch_size=8", "--config.training.log_every=1",
        "--config.training.checkpoint_every=2", "--config.training.warmup_steps=1",
        "--config.training.lr_schedule=constant", "--config.sampling.every=1000",
        "--config.sampling.per_prompt=1", "--config.sampling.num_steps=2"]


pytestmark = pytest.mark.usefixtures("compilation_cache")   # tests/conftest.py


# -- the prompt grammar ---------------------------------------------------------------------------

def test_heldout_prompts_are_never_training_prompts_and_cover_every_digit():
    for d in range(10):
        train, held = set(mp.all_prompts("train", d)), set(mp.all_prompts("heldout", d))
        assert train and held and not train & held
        for p in train | held:  # the digit's name or numeral is in every prompt
            assert mp.DIGIT_NAMES[d] in p.split() or str(d) in p.split()
    # Every prompt names exactly one digit: no prompt of digit d is a prompt of another digit.
    every = [set(mp.all_prompts(s, d)) for s in mp.SPLITS for d in range(10)]
    assert sum(len(s) for s in every) == len(set().union(*every))
    words = set(mp.training_words())
    for d in range(10):  # held-out phrasings use training words only
        assert all(set(p.split()) <= words for p in mp.all_prompts("heldout", d))


@pytest.mark.slow
def test_training_sampler_never_produces_a_heldout_prompt_and_is_deterministic():
    labels = np.arange(2000) % 10
    prompts = mp.sample_prompts(labels, jax.random.key(3), "train")
    held = {p for d in range(10) for p in mp.all_prompts("heldout", d)}
    assert not set(prompts) & held
    for d in range(10):  # each label's prompts are that digit's, and varied
        mine = {p for p, y in zip(prompts, labels) if y == d}
        assert mine <= set(mp.all_prompts("train", d)) and len(mine) > 20
    assert prompts == mp.sample_prompts(labels, jax.random.key(3), "train")
    assert prompts != mp.sample_prompts(labels, jax.random.key(4), "train")
    # The jitted draw (what the loss uses) gives the same indices as the host one.
    idx = jax.jit(lambda k: mp.prompt_indices(k, 50, "heldout"))(jax.random.key(1))
    t, f, a = (np.asarray(v) for v in idx)
    assert t.max() < len(mp.HELDOUT_TEMPLATES) and f.max() < 2 and a.max() < len(mp.COMBOS)
    table = mp.prompt_table("heldout")
    got = mp.sample_prompts(np.arange(50) % 10, jax.random.key(1), "heldout")
    assert got == [table[i % 10][t[i]][f[i]][a[i]] for i in range(50)]
    with pytest.raises(ValueError, match="split"):
        mp.sample_prompts([1], jax.random.key(0), "test")
    with pytest.raises(ValueError, match="labels"):
        mp.sample_prompts([10], jax.random.key(0), "train")


# -- the tokenizer --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from experiments.latent_data import build_tokenizer

    path = str(tmp_path_factory.mktemp("tok") / "tokenizer")
    build_tokenizer(path, 12)
    return path


def test_tokenizer_round_trip_one_token_per_word(tokenizer_dir):
    from jaxdiff.text import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tokenizer_dir)
    assert tok.max_length == 12 and tok.eos_token_id == tok.vocab_size - 1
    for w in mp.training_words():
        assert tok.tokenize(w) == [w + "</w>"]
    prompts = [p for s in mp.SPLITS for d in range(10) for p in mp.all_prompts(s, d)]
    ids = tok(prompts).input_ids
    for p, row in zip(prompts, ids):
        assert tok.decode(row) == p
        assert row[0] == tok.bos_token_id and list(row).count(tok.eos_token_id) >= 1
        assert 2 + len(p.split()) <= 12   # never truncated
    assert tok([""]).input_ids[0].tolist() == [tok.bos_token_id] + [tok.eos_token_id] * 11


def test_transformers_loads_the_tokenizer_with_the_same_ids(tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    from jaxdiff.text import CLIPTokenizer

    ours = CLIPTokenizer.from_pretrained(tokenizer_dir)
    theirs = transformers.CLIPTokenizer.from_pretrained(tokenizer_dir)
    prompts = ["a handwritten seven", "the number 7 written by hand", "", "a thin digit 0"]
    want = theirs(prompts, padding="max_length", max_length=12, truncation=True).input_ids
    np.testing.assert_array_equal(ours(prompts).input_ids, np.asarray(want))


# -- training -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("mnist"))
    write_fake_mnist(path, n_train=40, n_test=10)
    return path


def _args(workdir, data_dir, steps, *extra):
    return [f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
            f"--config.training.num_steps={steps}", *TINY, *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    """4 steps in one go; the autoencoder trained first into WORKDIR/vae."""
    from experiments import train_latent_mnist

    workdir = str(tmp_path_factory.mktemp("latent") / "run")
    return workdir, train_latent_mnist.main(_args(workdir, data_dir, 4))


@pytest.mark.slow
def test_two_stages_write_vae_latents_checkpoint_grid_and_diffusers(trained):
    workdir, summary = trained
    assert summary["end_step"] == 4 and summary["checkpoint_step"] == 4
    assert summary["vae_dir"] == os.path.join(workdir, "vae")
    vae_rows = [json.loads(line) for line in open(os.path.join(workdir, "vae", "metrics.jsonl"))]
    assert [r["step"] for r in vae_rows] == [1, 2]
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) and 0 < r["loss"] < 10 for r in rows)
    stats = json.load(open(os.path.join(workdir, "latent_stats.json")))
    with np.load(os.path.join(workdir, "latents.npz")) as f:
        mean, std = f["mean"], f["std"]
    assert mean.shape == (40, 8, 8, 2) and (std > 0).all()
    z_var = mean.astype(np.float64).var() + (std.astype(np.float64) ** 2).mean()
    np.testing.assert_allclose(stats["scaling_factor"], z_var ** -0.5, rtol=1e-6)
    grid = os.path.join(workdir, "samples", "step_000004.png")
    assert os.path.isfile(grid)
    prompts = open(grid[:-4] + ".txt").read().split("\n")[:10]
    for d, p in enumerate(prompts):
        assert p in mp.all_prompts("heldout", d)
    assert os.path.isfile(os.path.join(workdir, "diffusers", "model_index.json"))


@pytest.mark.slow
def test_resume_is_exact_and_an_existing_vae_is_reused(trained, data_dir, tmp_path):
    """2 steps, then resumed to 4 (a constant learning rate), on the first run's autoencoder ==
    the 4 steps in one go."""
    from experiments import latent_lib, train_latent_mnist

    ref_dir, _ = trained
    workdir = str(tmp_path / "resumed")
    vae = f"--config.vae_workdir={os.path.join(ref_dir, 'vae')}"
    quick = ["--config.sampling.every=0", "--config.export_diffusers=False"]
    first = train_latent_mnist.main(_args(workdir, data_dir, 2, vae, *quick))
    assert first["end_step"] == 2 and not os.path.isdir(os.path.join(workdir, "vae"))
    second = train_latent_mnist.main(_args(workdir, data_dir, 4, vae, *quick))
    assert second["start_step"] == 2 and second["end_step"] == 4
    a = latent_lib.load_latent_run(ref_dir).sd.params
    b = latent_lib.load_latent_run(workdir).sd.params
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_text_to_image_samples_the_exported_folder(trained, tmp_path):
    from PIL import Image

    from experiments import text_to_image

    from experiments import latent_lib, latent_pipeline
    from experiments.configs import latent_mnist
    from jaxdiff.pipelines import read_generation_defaults

    workdir, _ = trained
    folder = os.path.join(workdir, "diffusers")
    # the folder records the run's sampling settings (sampling.num_steps=2 here) and the crop
    recorded = read_generation_defaults(folder)
    run_config = latent_lib.load_latent_run(workdir).config
    assert recorded == latent_pipeline.generation_defaults(run_config)
    default = latent_mnist.get_config().sampling
    assert (recorded.sampler, recorded.num_steps, recorded.guidance_scale) == (
        default.sampler, 2, default.guidance_scale)
    assert recorded.crop == (2, 2, 28, 28) and recorded.height == 32
    out = str(tmp_path / "seven.png")
    images = text_to_image.main([f"--model={folder}", "--prompt=a handwritten seven",
                                 f"--out={out}"])
    assert images.shape == (1, 28, 28, 1)                   # MNIST's size: the padding cropped
    assert Image.open(out).mode == "L" and Image.open(out).size == (28, 28)


@pytest.mark.slow
def test_eval_latent_mnist_writes_its_json_table_and_grid(trained, data_dir, tmp_path):
    """eval_latent_mnist on the 4-step run (an untrained classifier, N = 300 from 10 test
    images): the three prompt rows, the floors at N, the JSON, the markdown table's layout and the
    held-out grid (10 prompts x 8 samples)."""
    from PIL import Image

    from experiments import eval_latent_mnist
    from jaxdiff.metrics import init_classifier, save_classifier

    workdir, _ = trained
    clf = str(tmp_path / "clf.msgpack")
    save_classifier(clf, init_classifier(jax.random.key(0)))
    md, png = str(tmp_path / "t.md"), str(tmp_path / "g.png")
    res = eval_latent_mnist.main([f"--workdir={workdir}", f"--data_dir={data_dir}",
                                  f"--classifier_path={clf}", "--num_samples=300",
                                  "--batch_size=150", "--steps=1", f"--out_md={md}",
                                  "--attr_samples=4", "--sampler=euler",
                                  f"--out_png={png}", "--name=eval_test"])
    assert list(res["rows"]) == ["held-out templates", "training templates", "empty prompt"]
    assert list(res["floors"]) == ["300"] and res["steps"] == 1 and not res["classifier"][
        "trained_now"]
    for name, r in res["rows"].items():
        assert r["n"] == 300 and len(r["example_prompts"]) == 10
        assert ("conditional_accuracy" in r) == (name != "empty prompt")
    assert len(res["rows"]["empty prompt"]["class_histogram"]) == 10
    # --rows: one row alone, drawn as in the full table (the same prompts, noise and scores)
    one = eval_latent_mnist.main([f"--workdir={workdir}", f"--data_dir={data_dir}",
                                  f"--classifier_path={clf}", "--num_samples=300",
                                  "--batch_size=150", "--steps=1", "--attr_samples=0",
                                  "--sampler=euler", "--rows=train", "--name=eval_one"])
    assert list(one["rows"]) == ["training templates"] and one["attributes"] is None
    full_row, one_row = res["rows"]["training templates"], one["rows"]["training templates"]
    assert one_row["example_prompts"] == full_row["example_prompts"]
    np.testing.assert_allclose(one_row["fid"], full_row["fid"], rtol=1e-4)
    assert json.load(open(os.path.join(workdir, "eval_test.json")))["rows"].keys() == res[
        "rows"].keys()
    lines = open(md).read().split("\n")
    assert lines[0].startswith(f"Run {workdir} at step 4; sampler euler, 1 steps")
    assert lines[1] == ""
    assert lines[2].startswith("| prompts | N | conditional accuracy | FD (floor at N) |")
    assert [ln.split(" | ")[0] for ln in lines[4:7]] == [
        "| held-out templates", "| training templates", "| empty prompt"]
    assert lines[-2].startswith("Latent statistics: {") and lines[-1] == ""
    # the attribute table: three pairs, generated and real, and the unseen composition
    att = res["attributes"]
    assert list(att["pairs"]) == ["thickness", "size", "slant"]
    for p in att["pairs"].values():
        assert p["generated"]["low"]["n"] == p["generated"]["high"]["n"] == 4
        assert p["real"]["low"]["n"] + p["real"]["high"]["n"] <= 10
    assert att["composition"]["prompt_example"] in ("a thick slanted digit zero",
                                                    "a thick slanted digit 0")
    assert set(att["composition"]["thickness"]["vs"]) == {"thin", "thick"}
    assert set(att["composition"]["slant"]["vs"]) == {"upright", "slanted"}
    table = [ln for ln in lines if ln.startswith("| thickness | thin / thick |")]
    assert len(table) == 1 and len(table[0].split(" | ")) == 10
    assert Image.open(png).size[1] > 10 * 32   # ten prompt rows (upscaled), prompts on the left


@pytest.mark.parametrize("extra, needle", [
    (["--config.model.context_dim=32"], "model.context_dim (32) must equal text.hidden_size"),
    (["--config.data.pad_to=30"], "data.pad_to must be a multiple of 8"),
    (["--config.vae_workdir=/nonexistent/vae"], "vae_workdir '/nonexistent/vae' holds no"),
    (["--config.sampling.sampler=nope"], "sampling.sampler"),
    (["--config.latent_scaling=-1.0"], "latent_scaling must be 0 (1 / std, measured) or a pos"),
])
def test_cli_config_error_is_one_line_and_writes_nothing(tmp_path, capsys, extra, needle):
    from experiments import train_latent_mnist

    workdir = str(tmp_path / "never")
    with pytest.raises(SystemExit) as e:
        train_latent_mnist.cli_main([f"--workdir={workdir}", *extra])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and needle in err
    assert not os.path.exists(workdir)


def test_eval_rows_flag_names_the_bad_row():
    from experiments import eval_latent_mnist
    from experiments.cli import ConfigError

    with pytest.raises(ConfigError, match="--rows must be a non-empty list of heldout, train, "
                       "empty, got 'heldout,nope'"):
        eval_latent_mnist.main(["--workdir=/nonexistent", "--rows=heldout,nope"])


def test_default_config_is_valid():
    from experiments import latent_lib
    from experiments.configs import latent_mnist

    unet = latent_lib.validate_config(latent_mnist.get_config())
    assert unet.config.in_channels == 4 and unet.config.context_dim == 64


def test_latent_scaling_replaces_the_measured_factor_and_keeps_it():
    from experiments import latent_data, latent_lib

    rng = np.random.default_rng(0)
    mean, std = rng.normal(0.5, 2.0, (50, 2, 2, 4)), np.full((50, 2, 2, 4), 0.5)
    stats = latent_data.latent_statistics(mean, std)
    assert latent_lib.with_latent_scaling(stats, 0.0) == stats
    fixed = latent_lib.with_latent_scaling(stats, 1.0)
    assert fixed["scaling_factor"] == 1.0 and stats["scaling_factor"] < 0.6
    assert fixed["measured_scaling_factor"] == stats["scaling_factor"]


def test_the_exported_defaults_are_the_runs_sampling_settings():
    """jaxdiff_generation.json of the export: config.sampling's sampler, steps and guidance (not
    fixed numbers), the padded size and the crop back to 28x28."""
    from experiments import latent_pipeline
    from experiments.configs import latent_mnist
    from jaxdiff.samplers import get_sampler

    c = latent_mnist.get_config()
    c.sampling.num_steps, c.sampling.guidance_scale, c.data.pad_to = 7, 1.5, 40
    d = latent_pipeline.generation_defaults(c)
    assert (d.num_steps, d.guidance_scale, d.height, d.width) == (7, 1.5, 40, 40)
    assert d.crop == (6, 6, 28, 28)
    assert get_sampler(d.sampler, **d.sampler_options).options == \
        latent_pipeline.make_sampler(c).options
    c.sampling.sampler = "dpmpp_2m"
    assert latent_pipeline.generation_defaults(c).sampler == "dpmpp_2m"


@pytest.mark.slow
def test_a_run_of_the_old_captions_is_refused_with_one_line(trained, data_dir, tmp_path, capsys):
    """A workdir trained before the adjectives were measured (no caption_scheme) is not resumed
    with the new captions; its checkpoints and tokenizer stay as they were."""
    import shutil

    from experiments import train_latent_mnist

    ref_dir, _ = trained
    workdir = str(tmp_path / "old")
    shutil.copytree(ref_dir, workdir)
    path = os.path.join(workdir, "latent_stats.json")
    stats = json.load(open(path))
    assert stats["caption_scheme"] == mp.CAPTION_SCHEME and "thickness" in stats[
        "attribute_thresholds"]
    del stats["caption_scheme"]
    json.dump(stats, open(path, "w"))
    vocab = open(os.path.join(workdir, "tokenizer", "vocab.json")).read()
    with pytest.raises(SystemExit) as e:
        train_latent_mnist.cli_main(_args(workdir, data_dir, 6))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "other captions" in err
    assert f"--config.vae_workdir={os.path.join(workdir, 'vae')}" in err
    assert open(os.path.join(workdir, "tokenizer", "vocab.json")).read() == vocab
