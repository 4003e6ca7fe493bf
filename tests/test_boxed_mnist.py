"""The "boxed" concept of the DreamBooth demo: the dataset command (an image folder, deterministic),
the box detector (real MNIST digits boxed or not; blur, shifts, and bright strokes that are not a
box), the scoring of known images, and the evaluation end to end on a tiny diffusers folder."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from experiments import boxed_concept, boxed_mnist, concept_eval, latent_data, latent_pipeline
from experiments.cli import ConfigError

MNIST_DIR = os.environ.get("JAXDIFF_MNIST_DIR", "")
needs_mnist = pytest.mark.skipif(
    not os.path.isfile(os.path.join(MNIST_DIR, "t10k-images-idx3-ubyte.gz")),
    reason="real MNIST ($JAXDIFF_MNIST_DIR) is not on this machine")


@pytest.fixture(scope="module")
def mnist_test():
    from jaxdiff.data import load_mnist

    if not os.path.isfile(os.path.join(MNIST_DIR, "t10k-images-idx3-ubyte.gz")):
        pytest.skip("real MNIST ($JAXDIFF_MNIST_DIR) is not on this machine")
    return load_mnist("test", MNIST_DIR)


def _fake_mnist(n=200, seed=0):
    """Digit-like images: a bright random blob in the centre of a black 28x28 frame."""
    rng = np.random.default_rng(seed)
    x = -np.ones((n, 28, 28, 1), np.float32)
    x[:, 6:22, 8:20, 0] = np.where(rng.random((n, 16, 12)) > 0.6, 1.0, -1.0)
    return x, (np.arange(n) % 10).astype(np.int32)


def _blur(images, passes=1):
    """A 3x3 binomial blur (weights 1 2 1 / 4 each way), ``passes`` times: a decoder's soft
    edges."""
    x = np.asarray(images, np.float32)
    for _ in range(passes):
        p = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
        x = (p[:, :-2] + 2 * p[:, 1:-1] + p[:, 2:]) / 4
        x = (x[:, :, :-2] + 2 * x[:, :, 1:-1] + x[:, :, 2:]) / 4
    return x


# --- the dataset --------------------------------------------------------------------------------

def test_dataset_is_an_image_folder_of_boxed_digits_and_deterministic(tmp_path):
    images, labels = _fake_mnist()
    recs = boxed_concept.make_boxed_dataset(str(tmp_path / "a"), images, labels, seed=3)
    boxed_concept.make_boxed_dataset(str(tmp_path / "b"), images, labels, seed=3)
    other = boxed_concept.make_boxed_dataset(str(tmp_path / "c"), images, labels, seed=4)
    folder = tmp_path / "a"
    meta = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    pngs = sorted(p.name for p in folder.glob("*.png"))
    assert len(meta) == 20 and sorted(m["file_name"] for m in meta) == pngs
    assert set(os.listdir(folder)) == set(pngs) | {"metadata.jsonl"}
    assert all(set(m) == {"file_name", "text"} for m in meta)
    assert all(boxed_concept.CONCEPT_WORD in m["text"].split() for m in meta)
    # balanced over the default digits, and each caption names its image's digit
    digits = [r["digit"] for r in recs]
    assert sorted(digits) == sorted(list(boxed_concept.DEFAULT_DIGITS) * 10)
    for r, m in zip(recs, meta):
        d = r["digit"]
        words = m["text"].split()                  # the digit, then the new word (causal text)
        assert words[-1] == boxed_concept.CONCEPT_WORD
        assert words[-2] in (str(d), ["zero", "one", "two", "three", "four", "five", "six",
                                      "seven", "eight", "nine"][d])
    # 32x32 grayscale, the box drawn, the digit's own pixels kept
    px = np.stack([np.asarray(Image.open(folder / m["file_name"])) for m in meta])
    assert px.shape == (20, 32, 32) and px.dtype == np.uint8
    assert Image.open(folder / meta[0]["file_name"]).mode == "L"
    assert (boxed_concept.box_scores(px[..., None] / 127.5 - 1) == 1.0).all()
    src = latent_data.pad_images(images[[r["index"] for r in recs]], 32)
    inside = slice(boxed_concept.MARGIN + boxed_concept.WIDTH, 32 - boxed_concept.MARGIN -
                   boxed_concept.WIDTH)
    np.testing.assert_array_equal(px[:, inside, inside] / 127.5 - 1, src[:, inside, inside, 0])
    # the same arguments write the same bytes; another seed other images
    for name in pngs + ["metadata.jsonl"]:
        assert (folder / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert [r["index"] for r in other] != [r["index"] for r in recs]


def test_dataset_reads_as_an_image_folder(tmp_path):
    """What jaxdiff.data.read_image_folder (the fine-tuning's reader) and load_images get: the
    captions of metadata.jsonl, the pixels as written (gray in three equal channels)."""
    from jaxdiff.data import load_images, read_image_folder

    images, labels = _fake_mnist()
    recs = boxed_concept.make_boxed_dataset(str(tmp_path / "d"), images, labels,
                                            digits=(1, 4, 9), num_images=7)
    folder = read_image_folder(str(tmp_path / "d"), on_bad_image="error")
    assert len(folder) == 7 and not folder.skipped
    assert sorted(zip((os.path.basename(f) for f in folder.files), folder.captions)) == \
        sorted((r["file_name"], r["text"]) for r in recs)
    pixels = np.asarray(load_images(folder, 32))
    assert pixels.shape == (7, 32, 32, 3)
    expect = boxed_concept.draw_box(latent_data.pad_images(
        images[[r["index"] for r in sorted(recs, key=lambda r: r["file_name"])]], 32))
    np.testing.assert_allclose(pixels, np.repeat(expect, 3, -1), atol=1 / 127.5)
    for line in (tmp_path / "d" / "metadata.jsonl").read_text().splitlines():
        entry = json.loads(line)
        with Image.open(tmp_path / "d" / entry["file_name"]) as im:
            im.load()
            assert im.size == (32, 32)
        assert int(entry["file_name"].split("_")[1][0]) in (1, 4, 9)
    # --word_position before: the same images, the captions with the word in front
    front = boxed_concept.make_boxed_dataset(str(tmp_path / "f"), images, labels,
                                             digits=(1, 4, 9), num_images=7, position="before")
    assert [r["index"] for r in front] == [r["index"] for r in recs]
    assert [r["text"] for r in front] == ["boxed " + r["text"][:-len(" boxed")] for r in recs]
    with pytest.raises(ValueError, match="position"):
        boxed_concept.make_boxed_dataset(str(tmp_path / "g"), images, labels, position="up")


def test_dataset_refuses_an_existing_folder_and_bad_digits(tmp_path):
    images, labels = _fake_mnist()
    (tmp_path / "x").mkdir()
    with pytest.raises(ValueError, match="already exists"):
        boxed_concept.make_boxed_dataset(str(tmp_path / "x"), images, labels)
    with pytest.raises(ValueError, match="only 20 images of digit 3"):
        boxed_concept.make_boxed_dataset(str(tmp_path / "y"), images, labels, digits=(3,),
                                       num_images=25)
    assert not (tmp_path / "y").exists() and not (tmp_path / "y.tmp").exists()
    for bad in ("3,3", "10", "a", ""):
        with pytest.raises(ConfigError, match="--digits"):
            boxed_concept.parse_digits(bad)
    with pytest.raises(ConfigError, match="--out .* already exists"):
        boxed_mnist.main(["--out", str(tmp_path / "x")])


@needs_mnist
@pytest.mark.slow   # reads the 60k training images
def test_dataset_command_on_real_mnist(tmp_path, capsys):
    recs = boxed_mnist.main(["--out", str(tmp_path / "boxed"), "--digits", "2,5", "--seed", "1"])
    assert len(recs) == 20 and {r["digit"] for r in recs} == {2, 5}
    assert "wrote 20 boxed digits" in capsys.readouterr().out


# --- the detector -------------------------------------------------------------------------------

def test_detector_separates_boxed_from_plain_real_digits(mnist_test):
    plain = latent_data.pad_images(mnist_test[0][:400], 32)
    boxed = boxed_concept.draw_box(plain[:200])
    assert boxed_concept.has_box(boxed).all()
    assert not boxed_concept.has_box(plain[200:]).any()
    # soft edges (a decoder's blur) and a box one pixel off its place
    assert boxed_concept.has_box(_blur(boxed, 1)).all()
    assert not boxed_concept.has_box(_blur(plain[200:], 1)).any()
    for margin in (boxed_concept.MARGIN - 1, boxed_concept.MARGIN + 1):
        assert boxed_concept.has_box(boxed_concept.draw_box(plain[:50], margin=margin)).all()
    # RGB images (the tiny test model's VAE) score like grayscale
    np.testing.assert_array_equal(boxed_concept.box_scores(np.repeat(boxed[:20], 3, -1)),
                                  boxed_concept.box_scores(boxed[:20]))


def test_detector_is_not_fooled_by_bright_strokes_that_are_not_a_box(mnist_test):
    plain = latent_data.pad_images(mnist_test[0][:100], 32)
    # digits pushed against each border, so that their strokes lie on the box's place
    for shift in ((-5, 0), (5, 0), (0, -5), (0, 5)):
        moved = np.roll(plain, shift, axis=(1, 2))
        assert not boxed_concept.has_box(moved).any()
    # a digit scaled up to fill the frame (strokes crossing all four sides)
    big = np.asarray([np.asarray(Image.fromarray(((x[..., 0] + 1) * 127.5).astype(np.uint8))
                                 .resize((32, 32), Image.BILINEAR)) for x in mnist_test[0][:100]])
    assert not boxed_concept.has_box(big[..., None] / 127.5 - 1).any()
    # a 7's bar along the top side, three sides of the box, a white or hazy image, a cross
    x = -np.ones((5, 32, 32, 1), np.float32)
    m, w = boxed_concept.MARGIN, boxed_concept.WIDTH
    x[0, m:m + w, m:32 - m] = 1.0
    x[1] = boxed_concept.draw_box(x[1:2])[0]
    x[1, 32 - m - w:32 - m, m + w:32 - m - w] = -1.0
    x[2] = 1.0
    x[3] = -0.3
    x[4, :, 14:18] = 1.0
    x[4, 14:18, :] = 1.0
    assert not boxed_concept.has_box(x).any(), boxed_concept.box_scores(x)


def test_draw_box_and_detector_errors():
    with pytest.raises(ValueError, match="images must be"):
        boxed_concept.draw_box(np.zeros((2, 32, 30, 1)))
    with pytest.raises(ValueError, match="no room"):
        boxed_concept.draw_box(np.zeros((2, 8, 8, 1)), margin=3)
    with pytest.raises(ValueError, match="do not fit"):
        boxed_concept.box_scores(np.zeros((2, 32, 32, 1)), margin=0)
    with pytest.raises(ValueError, match="1 or 3"):
        boxed_concept.box_scores(np.zeros((2, 32, 32, 2)))


# --- scoring and the evaluation -----------------------------------------------------------------

def test_score_images_counts_the_detector_and_ignores_the_box_for_the_classifier(mnist_test):
    plain = latent_data.pad_images(mnist_test[0][:40], 32)
    labels = mnist_test[1][:40]
    images = plain.copy()
    images[::4] = boxed_concept.draw_box(plain[::4])          # 10 of 40 boxed
    row = concept_eval.score_images(images, labels, None)
    assert row["n"] == 40 and row["box_rate"] == 0.25 and "accuracy" not in row
    expect = {int(d): float(np.mean(np.arange(40)[labels == d] % 4 == 0))
              for d in np.unique(labels)}
    assert row["box_rate_by_digit"] == expect
    # the classifier sees the same pixels with or without the box
    np.testing.assert_array_equal(concept_eval.classifier_view(images),
                                  concept_eval.classifier_view(plain))
    with pytest.raises(ValueError, match="one digit per image"):
        concept_eval.score_images(images, labels[:3])


@pytest.mark.slow   # the classifier's compilation
def test_score_images_accuracy_is_the_classifiers_on_the_intended_digit(mnist_test):
    import jax
    from jaxdiff.metrics import classify, init_classifier

    plain = latent_data.pad_images(mnist_test[0][:40], 32)
    images = plain.copy()
    images[::4] = boxed_concept.draw_box(plain[::4])
    # labels chosen as what a random classifier answers: accuracy 1; shifted by one: 0
    params = init_classifier(jax.random.key(0))
    _, logits = classify(params, concept_eval.classifier_view(images))
    guess = np.argmax(logits, -1)
    row = concept_eval.score_images(images, guess, params)
    assert row["accuracy"] == 1.0
    row = concept_eval.score_images(images, (guess + 1) % 10, params)
    assert row["accuracy"] == 0.0 and row["box_rate"] == 0.25


def test_prompt_sets_and_targets():
    plan = concept_eval.prompt_sets((3, 7), 20, seed=0)
    assert list(plan) == list(concept_eval.SETS)
    assert set(plan["learnt"]["labels"]) == {3, 7}
    assert set(plan["composition"]["labels"]) == {0, 1, 2, 4, 5, 6, 8, 9}
    assert list(plan["prior"]["labels"]) == [i % 10 for i in range(20)]
    assert all("boxed" in p.split() for s in ("learnt", "composition")
               for p in plan[s]["prompts"])
    assert not any("boxed" in p for p in plan["prior"]["prompts"])
    again = concept_eval.prompt_sets((3, 7), 20, seed=0)
    assert all(again[k]["prompts"] == plan[k]["prompts"] for k in plan)
    assert concept_eval.prompt_sets((3, 7), 20, seed=1)["learnt"]["prompts"] != \
        plan["learnt"]["prompts"]
    with pytest.raises(ValueError, match="composition"):
        concept_eval.prompt_sets(tuple(range(10)), 5, 0)
    # the word in front: the same templates and draws, the word moved to the start
    front = concept_eval.prompt_sets((3, 7), 20, seed=0, word_position="before")
    for s in ("learnt", "composition"):
        for p, q in zip(plan[s]["prompts"], front[s]["prompts"]):
            assert q.startswith("boxed ") and q[len("boxed "):] == p[:-len(" boxed")], (p, q)
    assert front["prior"]["prompts"] == plan["prior"]["prompts"]
    with pytest.raises(ValueError, match="position"):
        concept_eval.prompt_sets((3, 7), 5, 0, word_position="middle")
    res = {"sets": {
        "learnt": {"rows": {"base": {"box_rate": 0.0}, "lora": {"box_rate": 0.95}}},
        "composition": {"rows": {"base": {"box_rate": 0.0, "accuracy": 0.99},
                                 "lora": {"box_rate": 0.8, "accuracy": 0.95}}},
        "prior": {"rows": {"base": {"box_rate": 0.0, "accuracy": 0.99},
                           "lora": {"box_rate": 0.01, "accuracy": 0.96}}}}}
    got = {(t["set"], t["metric"]): (round(t["value"], 6), t["pass"])
           for t in concept_eval.check_targets(res, "lora")}
    assert got == {("learnt", "box_rate"): (0.95, True), ("composition", "box_rate"): (0.8, False),
                   ("composition", "accuracy"): (0.95, True), ("prior", "box_rate"): (0.01, True),
                   ("prior", "accuracy drop vs base"): (0.03, False)}


@pytest.mark.slow   # a tiny diffusers folder, two compilations of the pipeline
def test_evaluate_concept_end_to_end_on_a_tiny_folder(tmp_path):
    pytest.importorskip("diffusers")
    import jax
    from jaxdiff.metrics import init_classifier
    from jaxdiff.pipelines import load_stable_diffusion
    from jaxdiff.pipelines.tiny import write_tiny_stable_diffusion

    path = str(tmp_path / "sd")
    write_tiny_stable_diffusion(path, max_length=32)
    sd = load_stable_diffusion(path)
    other = jax.tree.map(lambda p: p * 1.01, sd)
    clf = init_classifier(jax.random.key(0))
    res = concept_eval.evaluate_concept({"base": sd, "lora": other}, clf, n=4, num_steps=2,
                                        batch_size=4, log=lambda m: None)
    assert list(res["sets"]) == list(concept_eval.SETS)
    for entry in res["sets"].values():
        assert set(entry["rows"]) == {"base", "lora"}
        for row in entry["rows"].values():
            assert row["n"] == 4 and 0 <= row["box_rate"] <= 1 and 0 <= row["accuracy"] <= 1
            assert row["box_rate"] in (0.0, 0.25, 0.5, 0.75, 1.0) and row["time_s"] >= 0
    res["models"] = {"base": path, "lora": "perturbed"}
    res["tuned"] = "lora"
    res["targets"] = concept_eval.check_targets(res, "lora")
    assert len(res["targets"]) == len(concept_eval.TARGETS)
    md = concept_eval.markdown(res)
    assert md.count("| learnt |") == 3 and "Targets" in md   # two models, one target row
    json.dumps(res)   # JSON-ready
    # --negative_word: the prompts that hold the word are guided against it alone, the others
    # against the empty prompt as before
    assert concept_eval.negative_prompts(["boxed a 3", "a 3", "a boxed 3", "unboxed 3"],
                                         "boxed") == ["boxed", "", "boxed", ""]
    assert concept_eval.negative_prompts(["a 3"], "") is None
    assert concept_eval.guidance_prompts(["boxed a 3", "a 3", "a boxed 3"],
                                         "boxed") == ["a 3", "a 3", "a 3"]
    assert concept_eval.guidance_prompts(["a 3"], "") is None
    neg = concept_eval.evaluate_concept({"base": sd}, clf, n=4, num_steps=2, batch_size=4,
                                        negative_word="boxed", log=lambda m: None)
    assert neg["settings"]["negative_word"] == "boxed"
    for name, entry in neg["sets"].items():
        a = entry["rows"]["base"]["box_score_mean"]
        b = res["sets"][name]["rows"]["base"]["box_score_mean"]
        assert (a == b) == (name == "prior"), name    # only the prior set has no "boxed"
    for bad in ({"negative_prompts": ["boxed"]}, {"guidance_prompts": ["a 3"]}):
        with pytest.raises(ValueError, match="one per prompt"):
            latent_pipeline.sample(sd, ["a 3", "a 4"], jax.random.key(0), num_steps=1,
                                   guidance_scale=3.0, **bad)
    png = concept_eval.save_comparison_grid({"base": sd, "lora": other}, ["a boxed 3", "7"],
                                            str(tmp_path / "grid.png"), per_prompt=2,
                                            num_steps=2)
    with Image.open(png) as im:
        assert im.size[1] == 2 * 32 * 2 + 16   # two prompt rows at 2x, the names above
    assert "base, lora" in (tmp_path / "grid.txt").read_text()

    # the command line on the same folder, a model against itself, a given classifier
    if not os.path.isfile(os.path.join(MNIST_DIR, "t10k-images-idx3-ubyte.gz")):
        return
    from experiments import eval_concept
    from jaxdiff.metrics import save_classifier

    from jaxdiff.convert import save_lora
    from jaxdiff.lora import UNET_ATTENTION, init_lora

    save_classifier(str(tmp_path / "clf.msgpack"), clf)
    zero = init_lora(sd.params["unet"], UNET_ATTENTION, rank=2, key=jax.random.key(1))
    lora_file = save_lora(str(tmp_path / "zero.safetensors"), {"unet": zero})
    # --lora merges the file into the base (a LoRA with non-zero up changes the kernels)
    some = jax.tree.map(lambda x: x + 0.1, zero)
    some_file = save_lora(str(tmp_path / "some.safetensors"), {"unet": some})
    models, _ = eval_concept.load_models(path, f"{some_file}:0.5")
    diff = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                        models["lora"].params["unet"], sd.params["unet"])
    assert max(jax.tree.leaves(diff)) > 0
    # a LoRA with zero up, the base folder again: the same images, so the same rates
    out = tmp_path / "out"
    res = eval_concept.main(["--model", path, "--lora", lora_file + ":0.7", "--finetuned", path,
                             "--num_samples", "3",
                             "--steps", "2", "--detector_n", "20", "--classifier_path",
                             str(tmp_path / "clf.msgpack"), "--out_json", str(out) + ".json",
                             "--out_md", str(out) + ".md", "--out_png", str(out) + ".png",
                             "--grid_per_prompt", "1"])
    saved = json.loads((tmp_path / "out.json").read_text())
    assert saved["tuned"] == "lora" and len(saved["targets"]) == len(concept_eval.TARGETS)
    assert saved["lora_file_bytes"] == os.path.getsize(lora_file)
    for entry in saved["sets"].values():
        rows = entry["rows"]
        assert set(rows) == {"base", "lora", "finetuned"}
        assert rows["base"]["box_score_mean"] == pytest.approx(rows["lora"]["box_score_mean"],
                                                               abs=1e-5)
        assert rows["base"]["box_score_mean"] == rows["finetuned"]["box_score_mean"]
    assert saved["detector"]["real"] == {**res["detector"]["real"]}
    assert saved["detector"]["real"]["boxed_rate"] == 1.0
    assert saved["detector"]["real"]["unboxed_rate"] == 0.0
    assert saved["machine"]["jax"] == jax.__version__
    assert "| prior | finetuned | 3 |" in (tmp_path / "out.md").read_text()
    assert (tmp_path / "out.png").is_file()


def test_eval_concept_flag_errors_come_before_any_work(tmp_path, monkeypatch):
    import jaxdiff.pipelines
    from experiments import eval_concept

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the error")
    monkeypatch.setattr(jaxdiff.pipelines, "load_stable_diffusion", refuse)
    out = str(tmp_path / "r.json")
    (tmp_path / "a_file").write_text("")
    cases = {
        "--model is required": ["--out_json", out],
        "--out_json is required": ["--model", str(tmp_path)],
        "--concept_digits must be distinct": ["--model", str(tmp_path), "--out_json", out,
                                              "--concept_digits", "3,3"],
        "leave a digit": ["--model", str(tmp_path), "--out_json", out,
                          "--concept_digits", "0,1,2,3,4,5,6,7,8,9"],
        "--num_samples": ["--model", str(tmp_path), "--out_json", out, "--num_samples", "0"],
        "--out_md": ["--model", str(tmp_path), "--out_json", out,
                     "--out_md", str(tmp_path / "a_file" / "x.md")],
    }
    for message, argv in cases.items():
        with pytest.raises(ConfigError, match=message):
            eval_concept.main(argv)
    assert eval_concept.parse_lora_arg("a/b.safetensors:0.5") == ("a/b.safetensors", 0.5)
    assert eval_concept.parse_lora_arg("c:/x.safetensors") == ("c:/x.safetensors", 1.0)
    with pytest.raises(ConfigError, match="--lora"):
        eval_concept.parse_lora_arg(":0.5")
