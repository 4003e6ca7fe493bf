"""experiments.evaluation's shared pieces of the eval command lines, against what the command
lines computed and wrote inline before they shared them: the classifier's default path in the
workdir, the seeded reference draws and FD floors, and the written JSON / markdown / PNG."""

import io
import json
import os
from contextlib import redirect_stdout

import jax
import numpy as np
import pytest

from experiments import evaluation as ev
from experiments.images import save_grid
from jaxdiff.metrics import (classify, feature_statistics, frechet_distance, init_classifier,
                             save_classifier)


@pytest.fixture(scope="module")
def data():
    """Fake train / test arrays in the loaders' layout, and an untrained classifier."""
    rng = np.random.default_rng(0)

    def split(n):
        return (rng.uniform(-1, 1, (n, 28, 28, 1)).astype(np.float32),
                (np.arange(n) % 10).astype(np.int32))

    return split(40), split(30), init_classifier(jax.random.key(0))


@pytest.mark.slow
def test_workdir_classifier_defaults_to_the_workdir_file(data, tmp_path):
    train, test, clf = data
    save_classifier(str(tmp_path / ev.CLASSIFIER_FILE), clf)
    params, info = ev.workdir_classifier(str(tmp_path), "", train, test, seed=0, epochs=1)
    assert info["path"] == os.path.join(str(tmp_path), "mnist_classifier.msgpack")
    assert not info["trained_now"] and 0 <= info["test_accuracy"] <= 1
    other = tmp_path / "elsewhere.msgpack"
    save_classifier(str(other), clf)
    assert ev.workdir_classifier("/nonexistent", str(other), train, test, seed=0,
                                 epochs=1)[1]["path"] == str(other)


@pytest.mark.slow
def test_references_are_the_former_seeded_draws(data):
    """As eval_mnist / eval_score_mnist drew the floor (a test permutation, then a train one,
    from default_rng(seed)) and eval_sweep / eval_latent_mnist the rows at each N."""
    train, test, clf = data
    refs = ev.references(clf, train, test, [12, 5, 12], seed=3)
    assert list(refs) == [5, 12]
    rng = np.random.default_rng(3)
    test_perm, train_perm = rng.permutation(len(test[0])), rng.permutation(len(train[0]))
    for n, ref in refs.items():
        test_feats = classify(clf, test[0][test_perm[:n]])[0]
        np.testing.assert_array_equal(ref.data["images"], test[0][test_perm[:n]])
        np.testing.assert_array_equal(ref.data["feats"], test_feats)
        for got, want in zip(ref.stats, feature_statistics(test_feats)):
            np.testing.assert_array_equal(got, want)
        floor = frechet_distance(*feature_statistics(classify(clf, train[0][train_perm[:n]])[0]),
                                 *ref.stats)
        assert ref.real["fid"] == floor and ref.real["n"] == n
        want = ev.evaluate_samples(clf, train[0][train_perm[:n]], train[1][train_perm[:n]],
                                   ref.stats, reference=ref.data)
        assert json.dumps(ref.real) == json.dumps(want)


@pytest.mark.slow
def test_write_results_writes_what_the_command_lines_wrote(data, tmp_path):
    images = data[0][0][:6]
    results = {"b": 1.5, "a": [1, 2], "nested": {"z": None, "y": "x"}, "obj": object}
    table = "| metric | value |\n| --- | --- |\n| a | 1 |\n"
    grid = str(tmp_path / "grid.png")
    out = io.StringIO()
    with redirect_stdout(out):
        ev.write_results(results, table, json_path=str(tmp_path / "r.json"),
                         md_path=str(tmp_path / "r.md"), grid=(images, grid, 3),
                         json_default=str)
    assert open(tmp_path / "r.json").read() == json.dumps(results, indent=2, default=str)
    assert open(tmp_path / "r.md").read() == table
    assert out.getvalue() == f"[eval] wrote {grid}\n{table}\n"
    save_grid(images, str(tmp_path / "want.png"), ncols=3)
    assert open(grid, "rb").read() == open(tmp_path / "want.png", "rb").read()
    del results["obj"]
    with redirect_stdout(io.StringIO()):
        ev.write_results(results, table, json_path=str(tmp_path / "s.json"))  # no md, no grid
    assert open(tmp_path / "s.json").read() == json.dumps(results, indent=2)
    assert sorted(os.listdir(tmp_path)) == ["grid.png", "r.json", "r.md", "s.json", "want.png"]
    with pytest.raises(TypeError):   # without a default, as before: not JSON, an error
        ev.write_json(str(tmp_path / "t.json"), {"obj": object})
