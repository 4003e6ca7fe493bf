"""jaxdiff.cpu_compiler_options: the guarded XLA:CPU options, and that jaxdiff's jits use them."""

import jax
import numpy as np
import pytest

import jaxdiff
from jaxdiff.compile_options import CPU_COMPILER_OPTIONS, _supported
from jaxdiff.training import make_train_step
from jaxdiff.sharding import make_mesh, replicate, shard_batch
from tests.test_training import tiny_data, tiny_setup


def test_on_this_cpu_the_options_apply_exactly_when_xla_knows_them(monkeypatch):
    monkeypatch.delenv("JAXDIFF_CPU_COMPILER_OPTIONS", raising=False)
    monkeypatch.setenv("XLA_FLAGS", "")
    assert jax.default_backend() == "cpu"
    got = jaxdiff.cpu_compiler_options()
    # The jaxlib these tests pin knows the option: if it stops doing so, the options become {}
    # silently and the CPU speed-up with them, which must fail here rather than pass.
    assert _supported(), "this jaxlib no longer accepts CPU_COMPILER_OPTIONS"
    assert got == CPU_COMPILER_OPTIONS and got
    got["mutated"] = "x"  # a fresh dict each call: callers may modify theirs
    assert "mutated" not in jaxdiff.cpu_compiler_options()


@pytest.mark.parametrize("env,flags", [
    ({"JAXDIFF_CPU_COMPILER_OPTIONS": "0"}, ""),
    ({"JAXDIFF_CPU_COMPILER_OPTIONS": "off"}, ""),
    ({}, "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT"),  # the user's choice
])
def test_switched_off_by_the_environment(monkeypatch, env, flags):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("XLA_FLAGS", flags)
    assert jaxdiff.cpu_compiler_options() == {}


def test_unknown_option_is_detected_not_fatal(monkeypatch):
    """An XLA without the option must leave compilations untouched instead of failing them."""
    import jaxdiff.compile_options as co

    monkeypatch.setattr(co, "CPU_COMPILER_OPTIONS", {"xla_cpu_no_such_option_in_any_xla": "1"})
    co._supported.cache_clear()
    try:
        assert co.cpu_compiler_options() == {}
    finally:
        co._supported.cache_clear()


@pytest.mark.slow
def test_train_step_compiles_with_the_options_it_is_given(monkeypatch):
    """The options reach jax.jit: a bogus one fails the first call; an explicit {} (XLA's
    defaults) and the default (cpu_compiler_options, non-empty on this CPU) train to the same
    numbers within float32."""
    monkeypatch.delenv("JAXDIFF_CPU_COMPILER_OPTIONS", raising=False)
    monkeypatch.setenv("XLA_FLAGS", "")
    assert jaxdiff.cpu_compiler_options(), "default options are empty: {} vs None compares nothing"
    data = tiny_data(16)
    mesh = make_mesh()
    results = []
    for opts in ({"xla_cpu_no_such_option_in_any_xla": "1"}, {}, None):
        state, tx, lr_fn, loss_fn = tiny_setup()
        step_fn = make_train_step(loss_fn, tx, mesh, ema_decay=0.9, compiler_options=opts)
        state = replicate(state, mesh)
        if opts and "no_such" in next(iter(opts)):
            with pytest.raises(Exception, match="xla_cpu_no_such_option_in_any_xla"):
                step_fn(state, shard_batch(data, mesh))
            continue
        for _ in range(3):
            state, _ = step_fn(state, shard_batch(data, mesh))
        results.append(jax.device_get(state.params))
    for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
