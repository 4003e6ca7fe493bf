"""IDX reader checks, MNIST loading (local files, tfds mock), the resumable prefetching iterator."""

import gzip
import os
import threading
import time

import numpy as np
import pytest

from jaxdiff.data import (HOW_TO_GET_MNIST, BatchIterator, Prefetcher, load_mnist, read_idx,
                          write_idx)
from jaxdiff.data.mnist import MNIST_ENV_VAR, find_mnist_dir, mnist_search_dirs
from jaxdiff.validation import InvalidFileError

SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared",
                      "data", "mnist")


def write_fake_mnist(directory, n_train=64, n_test=16, gz=True, seed=0):
    """Writes small IDX files under the original names; returns (train images u8, labels)."""
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    ext = ".gz" if gz else ""
    out = None
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        imgs = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        lbls = (np.arange(n) % 10).astype(np.uint8)
        write_idx(os.path.join(directory, f"{prefix}-images-idx3-ubyte{ext}"), imgs)
        write_idx(os.path.join(directory, f"{prefix}-labels-idx1-ubyte{ext}"), lbls)
        if prefix == "train":
            out = imgs, lbls
    return out


@pytest.mark.parametrize("gz", [True, False])
def test_local_idx_roundtrip_and_scaling(tmp_path, gz):
    imgs, lbls = write_fake_mnist(str(tmp_path), gz=gz)
    x, y = load_mnist("train", str(tmp_path))
    assert x.shape == (64, 28, 28, 1) and x.dtype == np.float32
    assert y.dtype == np.int32 and (y == lbls).all()
    np.testing.assert_allclose(x[..., 0], imgs / 127.5 - 1.0, atol=1e-6)
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert load_mnist("test", str(tmp_path))[0].shape == (16, 28, 28, 1)


def test_truncated_file_names_the_file_and_says_how_to_get_mnist(tmp_path):
    write_fake_mnist(str(tmp_path), gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.*truncated") as e:
        load_mnist("train", str(tmp_path))
    assert HOW_TO_GET_MNIST in str(e.value)
    write_fake_mnist(str(tmp_path / "gz"), gz=True)  # a corrupt gzip stream
    gz = tmp_path / "gz" / "train-labels-idx1-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:-6])
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte.gz.*gzip") as e:
        load_mnist("train", str(tmp_path / "gz"))
    assert HOW_TO_GET_MNIST in str(e.value)


def test_bad_magic_dtype_and_dims(tmp_path):
    p = str(tmp_path / "x")
    with open(p, "wb") as f:
        f.write(b"\x01\x00\x08\x01" + np.uint32(3).byteswap().tobytes() + b"abc")
    with pytest.raises(ValueError, match="magic"):
        read_idx(p)
    write_idx(p, np.zeros((2, 28, 28), np.int32))
    with pytest.raises(ValueError, match="data type"):
        read_idx(p, expected_dtype=np.uint8)
    write_idx(p, np.zeros((2, 28), np.uint8))
    with pytest.raises(ValueError, match="dimensions"):
        read_idx(p, expected_ndim=3)
    write_idx(p, np.zeros((2, 27, 28), np.uint8))
    with pytest.raises(ValueError, match="dimension 1 is 27"):
        read_idx(p, expected_shape=(None, 28, 28))
    with open(p + ".gz", "wb") as f:
        f.write(gzip.compress(b"\x00\x00\x08\x01" + np.uint32(5).byteswap().tobytes()
                              + b"12345")[:-6])
    with pytest.raises(ValueError, match=r"x\.gz"):
        read_idx(p + ".gz")


def test_mismatched_counts_and_missing_dir(tmp_path):
    write_fake_mnist(str(tmp_path))
    write_idx(str(tmp_path / "train-labels-idx1-ubyte.gz"), np.zeros(5, np.uint8))
    with pytest.raises(ValueError, match="64 images but .* 5 labels"):
        load_mnist("train", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="how|IDX files"):
        load_mnist("train", str(tmp_path / "nope"))


def _one_error(call):
    """The InvalidFileError that ``call()`` raises, checked to be a single error (no chained
    cause or context: one message, not up to three tracebacks)."""
    with pytest.raises(InvalidFileError) as e:
        call()
    err = e.value
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__), err
    return str(e.value)


def test_corrupt_mnist_is_one_error_naming_the_file_and_what_was_expected(tmp_path):
    """Every corrupt-file case of load_mnist is ONE InvalidFileError (a ValueError) whose message
    names the file and what was expected: the magic number (2051 images / 2049 labels), the
    number of bytes, the label count; never a chain of gzip/IDX/MNIST tracebacks."""
    d = str(tmp_path)
    write_fake_mnist(d, n_train=20, n_test=4)
    images, labels = (os.path.join(d, f"train-{k}-idx{n}-ubyte.gz")
                      for k, n in (("images", 3), ("labels", 1)))
    original = {p: open(p, "rb").read() for p in (images, labels)}

    def load():
        return load_mnist("train", d)

    write_idx(images, np.zeros((20, 28, 28), np.int32))          # wrong type: magic 3075
    msg = _one_error(load)
    assert msg.startswith(images) and "magic number 3075" in msg and "expected 2051" in msg
    write_idx(images, np.zeros((20, 28, 28), np.uint8))
    write_idx(labels, np.zeros((20, 1), np.uint8))               # labels of rank 2: 2050
    msg = _one_error(load)
    assert msg.startswith(labels) and "expected 2049" in msg
    write_idx(labels, np.zeros(7, np.uint8))                     # 20 images, 7 labels
    msg = _one_error(load)
    assert msg.startswith(images) and "20 images but" in msg and labels in msg and "7 labels" in msg
    open(labels, "wb").write(original[labels][:-6])              # truncated gzip stream
    msg = _one_error(load)
    assert msg.startswith(labels) and "truncated or corrupt gzip file" in msg
    open(labels, "wb").write(original[labels])
    raw = gzip.decompress(original[images])
    open(images, "wb").write(gzip.compress(raw[:-100]))          # truncated IDX payload
    msg = _one_error(load)
    n = 20 * 28 * 28
    assert msg.startswith(images) and f"needs {n} data bytes, got {n - 100}" in msg
    assert HOW_TO_GET_MNIST in msg and "--config" not in msg     # no flag that may not exist
    with pytest.raises(FileNotFoundError) as e:
        load_mnist("train", str(tmp_path / "nope"), data_dir_name="--data_dir")
    assert "point --data_dir (or" in str(e.value)


def test_env_var_directory(tmp_path, monkeypatch):
    write_fake_mnist(str(tmp_path))
    monkeypatch.setenv(MNIST_ENV_VAR, str(tmp_path))
    assert find_mnist_dir() == str(tmp_path)
    assert load_mnist("train")[0].shape[0] == 64


def test_search_never_looks_in_the_build_machines_shared_copy(tmp_path, monkeypatch):
    """With ``$JAXDIFF_MNIST_DIR`` unset, ``../shared/data/mnist`` (relative to the working
    directory or to the checkout) is not searched even where it holds MNIST; ``./data/mnist``
    comes first."""
    monkeypatch.delenv(MNIST_ENV_VAR, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # ~/.cache/jaxdiff/mnist: empty here
    work, shared = tmp_path / "work", tmp_path / "shared" / "data" / "mnist"
    write_fake_mnist(str(shared))
    work.mkdir()
    monkeypatch.chdir(work)
    repo_shared = os.path.normpath(SHARED)
    dirs = mnist_search_dirs()
    assert str(shared) not in dirs and repo_shared not in dirs, dirs
    assert dirs[0] == str(work / "data" / "mnist")
    assert str(tmp_path / "home" / ".cache" / "jaxdiff" / "mnist") == dirs[-1]
    assert find_mnist_dir() not in (str(shared), repo_shared)
    write_fake_mnist(str(work / "data" / "mnist"))
    assert find_mnist_dir() == str(work / "data" / "mnist")


def test_env_var_that_lacks_the_files_is_an_error(tmp_path, monkeypatch):
    write_fake_mnist(str(tmp_path / "data" / "mnist"))  # a fallback that must not be used
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(MNIST_ENV_VAR, str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="empty"):
        find_mnist_dir()


REAL_MNIST = os.environ.get(MNIST_ENV_VAR)  # set by tests/conftest.py where the copy exists


@pytest.mark.skipif(not REAL_MNIST, reason=f"${MNIST_ENV_VAR} (a real MNIST copy) is not set")
def test_real_mnist_statistics():
    x, y = load_mnist("test", REAL_MNIST)
    assert x.shape == (10000, 28, 28, 1) and set(np.unique(y)) == set(range(10))
    assert abs(float(((x + 1) / 2).mean()) - 0.1325) < 0.002  # test-set mean (train: 0.1307)


def test_tfds_download_path_imports(tmp_path):
    """tfds' prepare/download path (what ``load_mnist`` runs when no local copy exists) needs
    modules that tfds does not declare (``importlib_resources``): resolve MNIST's URLs and
    checksums, which tfds ships, without touching the network."""
    tfds = pytest.importorskip("tensorflow_datasets")
    builder = tfds.builder("mnist", data_dir=str(tmp_path))
    urls = builder.url_infos
    assert len(urls) == 4 and any("t10k-images" in u for u in urls), urls


def test_tfds_failure_inside_tfds_is_named(monkeypatch):
    """An error inside tfds (offline, not prepared, a module tfds lacks) is a FileNotFoundError
    that names it and says how to get MNIST, not "tensorflow_datasets is not importable"."""
    pytest.importorskip("tensorflow_datasets")
    from jaxdiff.data import mnist

    def broken(split, data_dir):
        raise ModuleNotFoundError("No module named 'importlib_resources'")

    monkeypatch.setattr(mnist, "_load_tfds", broken)
    with pytest.raises(FileNotFoundError, match="tfds could not provide MNIST.*importlib_resources"
                       ) as e:
        load_mnist("train", source="tfds")
    assert HOW_TO_GET_MNIST in str(e.value) and "not importable" not in str(e.value)


def test_tfds_source_with_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
        x, y = load_mnist("train", source="tfds")
    assert x.shape == (12, 28, 28, 1) and x.dtype == np.float32 and y.dtype == np.int32
    assert x.min() >= -1.0 and x.max() <= 1.0


def _arrays(n=50):
    return {"image": np.arange(n, dtype=np.float32)[:, None], "label": np.arange(n, dtype=np.int32)}


def test_iterator_shuffles_deterministically_per_epoch():
    a = BatchIterator(_arrays(), 10, seed=1, process_index=0, process_count=1)
    b = BatchIterator(_arrays(), 10, seed=1, process_index=0, process_count=1)
    ep0 = [next(a)["label"] for _ in range(5)]
    assert sorted(np.concatenate(ep0).tolist()) == list(range(50))  # an epoch is a permutation
    assert a.state == {"epoch": 1, "index": 0}
    ep1 = [next(a)["label"] for _ in range(5)]
    assert not all((u == v).all() for u, v in zip(ep0, ep1))  # new order each epoch
    for u in ep0:
        np.testing.assert_array_equal(u, next(b)["label"])
    c = BatchIterator(_arrays(), 10, seed=2, process_index=0, process_count=1)
    assert not (next(c)["label"] == ep0[0]).all()


def test_iterator_resumes_from_state_through_prefetcher():
    ref = BatchIterator(_arrays(), 8, seed=0, process_index=0, process_count=1)
    expected = [next(ref)["label"] for _ in range(15)]
    with Prefetcher(BatchIterator(_arrays(), 8, seed=0, process_index=0, process_count=1), 3) as p:
        got = [next(p)["label"] for _ in range(9)]
        state = p.state  # the thread has run ahead; state is that of the consumed batches
    assert state == {"epoch": 1, "index": 3}
    it = BatchIterator.from_state(_arrays(), 8, 0, state, process_index=0, process_count=1)
    got += [next(it)["label"] for _ in range(6)]
    for u, v in zip(expected, got):
        np.testing.assert_array_equal(u, v)


def test_processes_take_disjoint_slices_of_the_global_batch():
    full = next(BatchIterator(_arrays(), 12, seed=5, process_index=0, process_count=1))["label"]
    parts = [next(BatchIterator(_arrays(), 12, seed=5, process_index=i, process_count=3))["label"]
             for i in range(3)]
    assert all(len(p) == 4 for p in parts)
    assert sorted(np.concatenate(parts).tolist()) == sorted(full.tolist())
    with pytest.raises(ValueError, match="divisible by the process count"):
        BatchIterator(_arrays(), 10, seed=0, process_index=0, process_count=3)
    with pytest.raises(ValueError, match="positive"):
        BatchIterator(_arrays(), 0, seed=0, process_index=0, process_count=1)


def _next_within(p, seconds=10.0):
    """``next(p)`` in a helper thread: returns what it raised (or returned); fails if it hangs."""
    out = []

    def call():
        try:
            out.append(next(p))
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out.append(e)

    t = threading.Thread(target=call, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"next() still blocked after {seconds} s"
    return out[0]


def test_prefetcher_reraises_errors_on_every_later_call():
    class Boom(BatchIterator):
        def __next__(self):
            raise RuntimeError("boom")

    with Prefetcher(Boom(_arrays(), 10, seed=0, process_index=0, process_count=1)) as p:
        with pytest.raises(RuntimeError, match="boom"):
            next(p)
        assert isinstance(_next_within(p), RuntimeError)  # again, instead of blocking forever
        assert isinstance(_next_within(p), RuntimeError)


class _Finite:
    def __init__(self, n):
        self.i, self.n = 0, n

    @property
    def state(self):
        return {"epoch": 0, "index": self.i}

    def __next__(self):
        if self.i == self.n:
            raise StopIteration
        self.i += 1
        return {"x": np.full(2, self.i)}


def test_prefetcher_end_repeats_stop_iteration_and_close_stops_thread():
    with Prefetcher(_Finite(2)) as p:
        assert [int(b["x"][0]) for b in p] == [1, 2] and p.state == {"epoch": 0, "index": 2}
        assert isinstance(_next_within(p), StopIteration)
    p = Prefetcher(BatchIterator(_arrays(), 10, seed=0, process_index=0, process_count=1), 2)
    next(p)
    time.sleep(0.2)  # let the thread fill the queue and block on put
    p.close()
    assert not p._thread.is_alive()
    assert isinstance(_next_within(p), StopIteration)  # next() after close() does not hang
