"""The pipelines' program cache (``jaxdiff.pipelines.program_cache``): hashable keys from options
and arrays, least-recently-used eviction, the first-call record. No model: plain functions."""

import threading

import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.pipelines.program_cache import ProgramCache, fingerprint, freeze
from jaxdiff.schedules import make_schedule


def test_freeze_is_hashable_and_equal_exactly_for_equal_values():
    a = freeze({"b": [1, 2.0, None], "a": np.arange(3), "c": {"x": "y"}})
    b = freeze({"a": np.arange(3), "c": {"x": "y"}, "b": [1, 2.0, None]})  # other order
    assert hash(a) == hash(b) and a == b
    assert freeze({"eta": 1}) != freeze({"eta": 1.0}) != freeze({"eta": True})
    assert freeze(np.arange(3)) != freeze(np.arange(3.0))        # dtype counts
    assert freeze(np.zeros((2, 3))) != freeze(np.zeros((3, 2)))  # shape counts
    assert freeze(jnp.arange(3)) == freeze(np.arange(3, dtype=np.int32))
    assert freeze(float("nan")) == freeze(float("nan"))         # nan != nan, frozen nans equal
    assert freeze([1, 2]) != freeze((1, 2))
    hash(freeze({"f": object()}))                               # unhashable -> by repr


def test_fingerprint_follows_the_content_not_the_object():
    s1, s2 = make_schedule("linear", 100), make_schedule("linear", 100)
    assert s1 is not s2 and fingerprint(s1) == fingerprint(s2)
    assert fingerprint(s1) is fingerprint(s1)                   # remembered while s1 lives
    assert fingerprint(make_schedule("cosine", 100)) != fingerprint(s1)
    assert fingerprint(make_schedule("linear", 101)) != fingerprint(s1)
    assert fingerprint((np.ones(3),)) != fingerprint((np.ones(3) * 2,))  # not weakref-able: fine


def test_cache_hits_misses_and_lru_eviction():
    cache = ProgramCache(max_programs=2)
    built = []

    def build(name):
        def make():
            built.append(name)
            return lambda: name
        return make

    f = cache.get("a", build("a"))
    assert cache.get("a", build("a")) is f and built == ["a"]
    cache.get("b", build("b"))
    cache.get("a", build("a"))          # "a" is now the most recently used
    cache.get("c", build("c"))          # evicts "b"
    assert cache.keys() == ["a", "c"] and "b" not in cache and len(cache) == 2
    assert cache.stats() == {"programs": 2, "hits": 2, "misses": 3, "evictions": 1}
    cache.get("b", build("b"))          # built again
    assert built == ["a", "b", "c", "b"]
    cache.clear()
    assert len(cache) == 0 and cache.stats()["misses"] == 0
    with pytest.raises(ValueError, match="max_programs must be an int >= 1"):
        ProgramCache(max_programs=0)


def test_first_call_records_each_signature_once():
    cache = ProgramCache()
    cache.get("k", lambda: (lambda: None))
    assert cache.first_call("k", ("shape", 1)) is True
    assert cache.first_call("k", ("shape", 1)) is False
    assert cache.first_call("k", ("shape", 2)) is True
    assert cache.first_call("missing", ("shape", 1)) is True   # not cached: it will compile


def test_concurrent_gets_build_one_program():
    cache = ProgramCache()
    results, start = [], threading.Barrier(8)

    def worker():
        start.wait()
        results.append(cache.get("k", lambda: object()))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(r) for r in results}) == 1 and len(cache) == 1
