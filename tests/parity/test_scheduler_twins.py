"""Every registered sampler's diffusers twin against the diffusers class it names: its
``defaults`` are exactly the class's constructor arguments (besides the training schedule's keys)
with diffusers' default values, its ``schedule_keys`` exactly the schedule keys the constructor
takes, and its ``beta_schedules`` exactly those the class builds. A config key that is not the
class's is ignored, as diffusers' ``from_config`` ignores it (same schedule, same sampler)."""

import inspect
import logging

import diffusers
import numpy as np
import pytest

from jaxdiff.convert import (
    ignored_config_keys,
    sampler_from_diffusers_config,
    schedule_from_diffusers_config,
)
from jaxdiff.samplers import diffusers_twins
from jaxdiff.samplers.diffusers_names import BETA_SCHEDULE_FROM_DIFFUSERS, SCHEDULE_DEFAULTS
from tests.parity.tolerances import diffusers_alphas_cumprod_atol, within

CLASSES = sorted(diffusers_twins())


def _ctor(cls_name):
    params = inspect.signature(getattr(diffusers, cls_name).__init__).parameters
    return {k: p.default for k, p in params.items() if k not in ("self", "kwargs")}


@pytest.mark.parametrize("cls_name", CLASSES)
def test_twin_declares_the_constructor(cls_name):
    twin = diffusers_twins()[cls_name].diffusers
    ctor = _ctor(cls_name)
    besides = {k: v for k, v in ctor.items() if k not in SCHEDULE_DEFAULTS}
    assert dict(twin.defaults) == besides
    assert twin.schedule_keys == set(ctor) & set(SCHEDULE_DEFAULTS)


@pytest.mark.parametrize("cls_name", CLASSES)
def test_twin_beta_schedules_are_those_diffusers_builds(cls_name):
    twin = diffusers_twins()[cls_name].diffusers
    cls = getattr(diffusers, cls_name)
    built = []
    for name in BETA_SCHEDULE_FROM_DIFFUSERS:
        try:
            cls(beta_schedule=name)
        except NotImplementedError:
            continue
        built.append(name)
    assert sorted(twin.beta_schedules) == sorted(built)


@pytest.mark.parametrize("cls_name", CLASSES)
def test_keys_of_other_classes_are_ignored_as_diffusers_ignores_them(cls_name, caplog):
    spec = diffusers_twins()[cls_name]
    own = set(spec.diffusers.defaults) | spec.diffusers.schedule_keys
    foreign = {}
    for other in diffusers_twins().values():  # one value per key of the other classes
        foreign.update({k: v for k, v in other.diffusers.defaults.items() if k not in own})
    foreign.update({k: True for k in SCHEDULE_DEFAULTS if k not in own})
    base = {"_class_name": cls_name}
    config = {**base, **foreign}
    assert ignored_config_keys(config) == tuple(sorted(foreign))
    with caplog.at_level(logging.INFO, logger="jaxdiff.convert.diffusers_scheduler"):
        sampler = sampler_from_diffusers_config(config)
    assert sampler.effective_options == sampler_from_diffusers_config(base).effective_options
    assert "ignored" in caplog.text or not foreign
    ref = getattr(diffusers, cls_name).from_config(config)  # diffusers ignores them too
    # diffusers' float32 cumprod (tolerances.diffusers_alphas_cumprod_atol)
    within(np.abs(np.asarray(schedule_from_diffusers_config(config).alphas_cumprod)
                  - ref.alphas_cumprod.numpy()),
           diffusers_alphas_cumprod_atol(ref), "alphas_cumprod")
    np.testing.assert_array_equal(np.asarray(schedule_from_diffusers_config(config).alphas_cumprod),
                                  np.asarray(schedule_from_diffusers_config(base).alphas_cumprod))


def test_a_key_no_class_takes_is_an_error_naming_it():
    with pytest.raises(ValueError, match="'no_such_key'.*nor of any scheduler class"):
        sampler_from_diffusers_config({"_class_name": "DDIMScheduler", "no_such_key": 1})
