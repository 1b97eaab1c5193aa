"""A model on several GPUs: one copy per device, each batch on whichever copy is free.

A repository entry with ``devices: [cuda:0, cuda:1]`` is Triton's ``instance_group`` with
``gpus: [0, 1]``: every listed GPU holds a copy of the weights and runs ``instances``
batches at a time. The batcher runs ``instances x GPUs`` batches at once; each takes a
free slot, and slots are handed out in turn, so requests spread over the GPUs.
Pre- and post-processing are the same for every copy (they run on the host).
"""

from __future__ import annotations

import dataclasses
import queue
from collections.abc import Callable, Sequence
from typing import Any

from cvserve.models.base import VisionModel
from cvserve.models.repository import ModelSpec
from cvserve.models.threads import release_team

__all__ = ["ReplicaSet", "build_replicas", "placement"]


def placement(spec: ModelSpec) -> tuple[str, ...]:
    """The devices a spec asks for: its ``devices`` list, or its one ``device``."""
    return spec.devices or (spec.device,)


def build_replicas(spec: ModelSpec, builder: Callable[[ModelSpec], VisionModel]) -> list[VisionModel]:
    """Build and load one copy of the model per device of ``spec`` (on the calling thread).

    Raises:
        Exception: whatever building or loading a copy raises (e.g. ``cuda:3`` absent).
    """
    models = []
    for device in placement(spec):
        model = builder(dataclasses.replace(spec, device=device, devices=()))
        model.load()
        models.append(model)
    release_team()  # loading's OpenMP team would slow the passes of other threads (models.threads)
    return models


class ReplicaSet:
    """Runs each batch on a free copy of the model.

    Args:
        models: the loaded copies, one per device.
        per_model: batches each copy runs at once (the entry's ``instances``).
        on_batch: called with the device of every batch run (metrics), from worker threads.
    """

    def __init__(
        self, models: Sequence[VisionModel], per_model: int, on_batch: Callable[[str], None] | None = None
    ) -> None:
        if not models or per_model < 1:
            raise ValueError(f"need at least one model and per_model >= 1, got {len(models)} and {per_model}")
        self.models = list(models)
        self.per_model = per_model
        self._on_batch = on_batch
        self._free: queue.Queue[int] = queue.Queue()
        for _ in range(per_model):
            for index in range(len(self.models)):  # interleaved: consecutive batches change GPU
                self._free.put(index)

    @property
    def slots(self) -> int:
        """Batches that can run at once over all copies."""
        return len(self.models) * self.per_model

    @property
    def devices(self) -> tuple[str, ...]:
        return tuple(str(m.device) for m in self.models)

    def forward(self, batch: list[Any]) -> Sequence[Any]:
        """One batch on the copy whose slot has waited longest (blocks while all are busy)."""
        index = self._free.get()
        try:
            if self._on_batch is not None:
                self._on_batch(str(self.models[index].device))
            return self.models[index].forward(batch)
        finally:
            self._free.put(index)
