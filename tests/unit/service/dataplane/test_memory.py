"""Out of memory in a batch: split outside the ``except`` block, single images fail alone."""

from __future__ import annotations

import asyncio
import gc
import weakref
from typing import Any

import pytest
import torch

from cvserve.dataplane.batcher import Batcher
from cvserve.dataplane.memory import run_splitting_on_oom
from cvserve.errors import ModelOutOfMemoryError
from cvserve.models.device import is_out_of_memory


class Activations:
    """Stands in for the tensors a forward pass holds when it runs out of memory."""


class FakeGpuModel:
    """Raises ``torch.cuda.OutOfMemoryError`` for batches above ``fits`` images (or for ``huge`` ones).

    Each failing call leaves an :class:`Activations` object in its frame and records a weak
    reference to it; every later call records whether the earlier ones were freed by then.
    """

    def __init__(self, fits: int, huge: frozenset[int] = frozenset()) -> None:
        self.fits, self.huge = fits, huge
        self.sizes: list[int] = []
        self.held: list[weakref.ref[Activations]] = []
        self.alive_at_retry: list[int] = []

    def __call__(self, items: list[int]) -> list[int]:
        self.alive_at_retry.append(sum(ref() is not None for ref in self.held))
        self.sizes.append(len(items))
        activations = Activations()
        self.held.append(weakref.ref(activations))
        if len(items) > self.fits or self.huge & set(items):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [x * 10 for x in items]


def test_both_kinds_count_as_out_of_memory() -> None:
    assert is_out_of_memory(MemoryError()) and is_out_of_memory(torch.cuda.OutOfMemoryError("x"))
    assert not is_out_of_memory(RuntimeError("CUDA error: an illegal memory access"))


def test_the_split_succeeds_and_each_item_runs_once_it_fits() -> None:
    model = FakeGpuModel(fits=2)
    assert run_splitting_on_oom(model, list(range(7)), "m") == [0, 10, 20, 30, 40, 50, 60]
    assert model.sizes == [7, 3, 1, 2, 4, 2, 2]


def test_the_failed_batch_is_freed_before_the_halves_run() -> None:
    gc.disable()  # frames must be freed by reference counting alone, not by a lucky collection
    try:
        model = FakeGpuModel(fits=1)
        run_splitting_on_oom(model, [1, 2, 3, 4], "m")
    finally:
        gc.enable()
    assert model.alive_at_retry == [0] * len(model.sizes)


def test_a_single_image_out_of_memory_fails_alone() -> None:
    model = FakeGpuModel(fits=4, huge=frozenset({3}))
    results = run_splitting_on_oom(model, [1, 2, 3, 4], "det")
    assert results[:2] == [10, 20] and results[3] == 40
    error = results[2]
    assert isinstance(error, ModelOutOfMemoryError)
    assert error.code.name == "RESOURCE_EXHAUSTED" and "out of memory" in error.message


def test_other_errors_are_not_split() -> None:
    calls: list[int] = []

    def broken(items: list[int]) -> list[int]:
        calls.append(len(items))
        raise RuntimeError("kernel failed")

    with pytest.raises(RuntimeError, match="kernel failed"):
        run_splitting_on_oom(broken, [1, 2, 3], "m")
    assert calls == [3]


def test_through_the_batcher_only_the_huge_image_fails() -> None:
    model = FakeGpuModel(fits=2, huge=frozenset({5}))

    async def main() -> list[Any]:
        b = Batcher(model, max_batch_size=8, max_wait_ms=50, max_queue=16)
        out = await asyncio.gather(*(b.submit(i) for i in range(8)), return_exceptions=True)
        await b.close()
        return out

    out = asyncio.run(main())
    assert [r for i, r in enumerate(out) if i != 5] == [0, 10, 20, 30, 40, 60, 70]
    assert isinstance(out[5], ModelOutOfMemoryError)
