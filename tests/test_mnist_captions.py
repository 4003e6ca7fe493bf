"""Captions that describe the image (experiments.mnist_prompts with measured attribute bins): the
adjective combinations and their requirements, the pair that never occurs in training, the
jitted draw (experiments.latent_lib.caption_ids) giving only adjectives true of each image,
the length check against text.max_length, and the bins kept beside the latents."""

import itertools
import os

import jax
import numpy as np
import pytest

from experiments import mnist_prompts as mp

_ADJ_OF = {w: a for w, (a, _) in mp.WORDS.items()}


def _words_true(prompt, bins):
    """Every adjective of ``prompt`` names the bin ``bins`` has for its attribute."""
    return all(bins[mp.WORDS[w][0]] == mp.WORDS[w][1] for w in prompt.split() if w in mp.WORDS)


def test_combos_and_requirements():
    req = mp.combo_requirements()
    assert mp.COMBOS[0] == () and (req[0] == -1).all()
    assert len(set(mp.COMBOS)) == len(mp.COMBOS)
    for c, words in enumerate(mp.COMBOS):
        assert len({_ADJ_OF[w] for w in words}) == len(words) <= 2   # one word per attribute
        assert (req[c] >= 0).sum() == len(words)
    # every measurable bin has a word, "bold" is a synonym of "thick", nothing unmeasured
    assert {(a, b) for a, b in mp.WORDS.values()} == {(a, b) for a in range(3) for b in (0, 2)}
    assert mp.WORDS["bold"] == mp.WORDS["thick"] and "neat" not in mp.WORDS
    assert "messy" not in mp.training_words() and "upright" in mp.training_words()
    bins = np.array(list(itertools.product(range(3), repeat=3)))
    allowed = np.asarray(mp.allowed_combos(bins))
    assert allowed[:, 0].all()
    assert allowed[bins.tolist().index([1, 1, 1])].sum() == 1          # nothing true but ()
    for b, row in zip(bins, allowed):
        for c in range(len(mp.COMBOS)):
            assert row[c] == all(b[mp.WORDS[w][0]] == mp.WORDS[w][1] for w in mp.COMBOS[c])


def test_a_thickness_word_and_a_slant_word_never_share_a_training_caption():
    assert mp.UNSEEN_PAIRS == (("thickness", "slant"),)
    thick = {w for w, (a, _) in mp.WORDS.items() if a == 0}
    slant = {w for w, (a, _) in mp.WORDS.items() if a == 2}
    n_pairs = {"size-thickness": 0, "size-slant": 0}
    for d in range(10):
        for p in mp.all_prompts("train", d):
            words = set(p.split())
            assert not (words & thick and words & slant), p
            n_pairs["size-thickness"] += bool(words & thick and words & {"small", "large"})
            n_pairs["size-slant"] += bool(words & slant and words & {"small", "large"})
    assert min(n_pairs.values()) > 0   # two adjectives do occur, just never this pair
    # the evaluation's prompt is made of training words, in a held-out template
    p = mp.caption("a {adj} digit {d}", 7, 0, ("thick", "slanted"))
    assert p == "a thick slanted digit seven" and set(p.split()) <= set(mp.training_words())
    assert mp.caption("a {adj} {d}", 8, 1) == "an 8"
    assert mp.caption("a {adj} digit {d}", 8, 0, ("upright",)) == "an upright digit eight"
    with pytest.raises(ValueError, match="words must be"):
        mp.caption("a {adj} {d}", 1, 0, ("neat",))
    with pytest.raises(ValueError, match="combo must be"):
        mp.fill("a {adj} {d}", 1, 0, len(mp.COMBOS))


def test_training_draw_weights_the_adjective_templates_and_the_words_of_the_image():
    # an image in the slanted third and the middle of the others: () or ("slanted",) are true
    n = 20000
    bins = np.tile(np.array([[1, 1, 2]], np.int8), (n, 1))
    t, f, c = (np.asarray(v) for v in jax.jit(
        lambda k: mp.prompt_indices(k, n, "train", bins))(jax.random.key(0)))
    slot = np.array(["{adj}" in x for x in mp.TRAIN_TEMPLATES])
    share = slot[t].mean()
    assert abs(share - mp.ADJ_TEMPLATE_SHARE) < 0.02          # sd of the share: 0.0035
    assert set(np.unique(c)) == {0, mp.COMBOS.index(("slanted",))}
    w = mp.COMBO_WORD_WEIGHT
    assert abs((c > 0).mean() - w / (1 + w)) < 0.02            # 2/3 say "slanted"
    assert abs(f.mean() - 0.5) < 0.02
    # every training template still occurs; without bins the draw stays uniform (evaluation)
    assert set(np.unique(t)) == set(range(len(mp.TRAIN_TEMPLATES)))
    tu, _, cu = (np.asarray(v) for v in mp.prompt_indices(jax.random.key(1), n, "heldout"))
    slot_h = np.array(["{adj}" in x for x in mp.HELDOUT_TEMPLATES])
    assert abs(slot_h[tu].mean() - slot_h.mean()) < 0.02
    assert abs(np.bincount(cu, minlength=len(mp.COMBOS)).max() / n - 1 / len(mp.COMBOS)) < 0.01
    np.testing.assert_allclose(np.exp(mp.template_logits("train")).sum(), 1.0, rtol=1e-6)


@pytest.mark.slow
def test_jitted_captions_are_true_of_each_image_and_cover_the_allowed_ones(tmp_path):
    from experiments import latent_data, latent_lib

    tok = latent_data.build_tokenizer(str(tmp_path / "tok"), 12)
    table, empty = latent_data.prompt_ids_table(tok)
    assert table.shape[:4] == (10, len(mp.TRAIN_TEMPLATES), 2, len(mp.COMBOS))
    n = 400
    rng = np.random.default_rng(0)
    labels = (np.arange(n) % 10).astype(np.int32)
    bins = rng.integers(0, 3, (n, 3)).astype(np.int8)
    bins[: n // 2] = 2   # half the images thick, large and slanted: every true combo is drawn
    fn = jax.jit(lambda k, t, e, y, b: latent_lib.caption_ids(*jax.random.split(k), t, e, y, b,
                                                              0.1))
    seen, train = {}, [set(mp.all_prompts("train", d)) for d in range(10)]
    for step in range(2):
        ids = np.asarray(fn(jax.random.key(step), table, empty, labels, bins))
        for i, row in enumerate(ids):
            p = tok.decode(row)
            if p == "":
                continue
            assert p in train[labels[i]], p
            assert _words_true(p, bins[i]), (p, bins[i])
            words = tuple(w for w in p.split() if w in mp.WORDS)
            seen.setdefault(tuple(bins[i]), set()).add(words)
    dropped = np.mean([tok.decode(r) == "" for r in ids])
    assert 0.03 < dropped < 0.2
    # a thick, large, slanted image gets each of its true words and pairs somewhere
    got = set().union(*(v for b, v in seen.items() if b == (2, 2, 2)))
    assert {("thick",), ("bold",), ("large",), ("slanted",), ("large", "thick"),
            ("large", "slanted"), ()} <= got
    # the host-side draw gives the same prompts as the table for the same key
    host = mp.sample_prompts(labels[:20], jax.random.key(5), "train", bins[:20])
    assert all(_words_true(p, b) for p, b in zip(host, bins[:20]))


def test_every_caption_fits_the_configured_max_length(tmp_path):
    from experiments import latent_data, latent_lib
    from experiments.cli import ConfigError
    from experiments.configs import latent_mnist

    c = latent_mnist.get_config()
    tok = latent_data.build_tokenizer(str(tmp_path / "tok"), c.text.max_length)
    prompts = mp.longest_prompts()
    assert "a thick slanted digit seven" in prompts
    for p in prompts:   # start + tokens + end, never cut
        assert len(tok.tokenize(p)) + 2 <= c.text.max_length, p
        assert tok.decode(tok([p]).input_ids[0]) == p
    longest = max(len(p.split()) for p in prompts) + 2
    c.text.max_length = longest - 1
    with pytest.raises(ConfigError, match="text.max_length"):
        latent_lib.validate_config(c)


def test_latents_cache_gains_the_bins_and_keeps_its_latents(tmp_path):
    """An older latents.npz (no bins) keeps its latents and gains bins and thresholds."""
    import ml_collections

    from experiments import latent_data
    from tests.test_data import write_fake_mnist

    data = str(tmp_path / "mnist")
    write_fake_mnist(data, n_train=30, n_test=10)
    config = ml_collections.ConfigDict({"data": {"source": "local", "data_dir": data,
                                                 "pad_to": 32}})
    workdir = str(tmp_path / "run")
    os.makedirs(workdir)
    ident = f"{os.path.abspath('/vae')}@3/pad32"
    mean = np.random.default_rng(0).normal(size=(30, 8, 8, 2)).astype(np.float32)
    np.savez(os.path.join(workdir, "latents.npz"), mean=mean, std=np.ones_like(mean),
             label=np.arange(30) % 10, ident=np.asarray(ident))
    out = latent_data.encoded_latents(config, workdir, None, None, "/vae", 3)   # no encoding
    np.testing.assert_array_equal(out["mean"], mean)
    assert out["bins"].shape == (30, 3) and out["thresholds"].shape == (10, 3, 2)
    assert set(np.unique(out["bins"])) <= {0, 1, 2}
    with np.load(os.path.join(workdir, "latents.npz")) as f:
        np.testing.assert_array_equal(f["bins"], out["bins"])
    record = latent_data.thresholds_json(out["thresholds"])
    assert list(record) == list(mp.ATTRIBUTES)
    np.testing.assert_array_equal(latent_data.thresholds_from_json(record), out["thresholds"])
    # a cache binned by |slant| (scheme v2) keeps its latents and is binned again (signed slant)
    with np.load(os.path.join(workdir, "latents.npz")) as f:
        old = {k: f[k] for k in f.files}
    assert str(old["slant_binning"]) == mp.SLANT_BINNING == "signed"
    old["slant_binning"] = np.asarray("magnitude")
    old["bins"] = np.full_like(old["bins"], 7)
    np.savez(os.path.join(workdir, "latents.npz"), **old)
    again = latent_data.encoded_latents(config, workdir, None, None, "/vae", 3)
    np.testing.assert_array_equal(again["mean"], mean)
    np.testing.assert_array_equal(again["bins"], out["bins"])


def test_the_scheme_names_its_slant_binning():
    """v3 bins the signed slant (a word for the right-leaning third); runs of v2 and before keep
    binning |slant| when evaluated, so that their thresholds mean what they meant."""
    assert mp.CAPTION_SCHEME == "measured-adjectives-v3" and mp.SLANT_BINNING == "signed"
    assert mp.slant_binning(mp.CAPTION_SCHEME) == "signed"
    assert mp.slant_binning("measured-adjectives-v2") == "magnitude"
    assert mp.slant_binning(None) == "magnitude"
