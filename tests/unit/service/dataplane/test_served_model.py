"""Resolving a spec's ``instances`` for the device its model landed on."""

from __future__ import annotations

import dataclasses

import pytest

from cvserve.dataplane import served_model
from cvserve.models.repository import ModelSpec
from cvserve.models.types import Task

SPEC = ModelSpec(name="m", task=Task.INSTANCE, config="c")


def test_a_fixed_count_is_kept_on_any_device() -> None:
    spec = dataclasses.replace(SPEC, instances=3)
    assert served_model.resolve_instances(spec, "cpu", False) == 3
    assert served_model.resolve_instances(spec, "cuda:0", True) == 3


def test_auto_is_one_on_a_gpu_and_the_cpu_rule_on_a_cpu(monkeypatch: pytest.MonkeyPatch) -> None:

    import cvserve.models.threads

    monkeypatch.setattr(cvserve.models.threads, "cpu_instances", lambda: 2)
    spec = dataclasses.replace(SPEC, instances="auto")
    assert served_model.resolve_instances(spec, "cuda", True) == 1
    assert served_model.resolve_instances(spec, "cpu", True) == 2
    # A custom handler's forward takes every core: two of them at once would fight over them.
    assert served_model.resolve_instances(spec, "cpu", False) == 1
