"""Data-parallel training: the process group, and real runs on two CPU processes."""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from cvserve.models.data.datasets import register_coco_split
from cvserve.models.data.synthetic import CATEGORIES, generate_dataset
from cvserve.models.instance.config import tiny_instance_config
from cvserve.models.training.engine import train
from cvserve.models.training.options import TrainOptions
from cvserve.models.training.parallel import ProcessGroup
from cvserve.models.training.ranks import check_devices, collective_timeout, rank_device, threads_per_process
from cvserve.models.training.validation import evaluate
from tests.fixtures import parallel_targets

# -- the process group ---------------------------------------------------------------------------


def test_group_runs_every_rank_and_restores_the_caller(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    out = str(tmp_path / "rank")
    with ProcessGroup(2, "cpu", [], parallel_targets.add_rank, (out,)):
        parallel_targets.add_rank(0, out)
    per_process = threads_per_process(2)
    for rank in (0, 1):
        assert Path(f"{out}.{rank}").read_text() == f"2 3.0 {per_process}"
    assert not dist.is_initialized()
    assert torch.get_num_threads() == threads


def test_a_failing_rank_is_reported_with_its_traceback() -> None:
    failure = r"training process 1 failed:(.|\n)*ValueError: bad shard on rank 1"
    group = ProcessGroup(2, "cpu", [], parallel_targets.fail, ("bad shard",))
    with pytest.raises(RuntimeError, match=failure), group:
        dist.barrier()  # rank 1 never arrives: the group breaks when its process exits
    assert not dist.is_initialized()


def test_an_error_in_the_caller_stops_the_other_ranks() -> None:
    group = ProcessGroup(2, "cpu", [], parallel_targets.wait, ())
    with pytest.raises(KeyError, match="caller's own"), group:
        raise KeyError("caller's own")
    assert all(not p.is_alive() for p in group._children)
    assert not dist.is_initialized()


def test_a_rank_that_dies_stops_the_others_at_once() -> None:
    # The caller waits on rank 2, which never sends: only the watchdog, which kills every
    # rank when one dies, can end the wait before the collective timeout.
    group = ProcessGroup(3, "cpu", [], parallel_targets.die_or_hang, ())
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"training process 1 died \(exit code 3\)"), group:
        dist.recv(torch.zeros(1), src=2)
    assert time.monotonic() - start < 60
    assert all(not p.is_alive() for p in group._children)
    assert not dist.is_initialized()


def test_ranks_end_when_the_calling_process_is_gone() -> None:
    code = "from cvserve.models import compat; compat.apply(); from tests.fixtures import parallel_targets as t; t.orphan_a_rank()"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    pid = int(out.stdout.split()[-1])
    deadline = time.monotonic() + 30
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(pid), f"rank 1 (pid {pid}) outlived the process that started it"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_the_collective_timeout_can_be_set(monkeypatch: pytest.MonkeyPatch) -> None:
    assert collective_timeout() == timedelta(minutes=10)
    monkeypatch.setenv("CVSERVE_COLLECTIVE_TIMEOUT_S", "90")
    assert collective_timeout() == timedelta(seconds=90)
    monkeypatch.setenv("CVSERVE_COLLECTIVE_TIMEOUT_S", "soon")
    with pytest.raises(ValueError, match="CVSERVE_COLLECTIVE_TIMEOUT_S must be a number of seconds > 0"):
        collective_timeout()


def test_devices_and_options_are_checked() -> None:
    assert rank_device("cpu", 1) == "cpu" and rank_device("cuda", 1) == "cuda:1"
    with pytest.raises(ValueError, match="one GPU per rank"):
        check_devices("cuda:1", 2)
    if torch.cuda.device_count() < 8:
        with pytest.raises(ValueError, match="8 processes need 8 GPUs"):
            check_devices("cuda", 8)
    with pytest.raises(ValueError, match="training option batch_size must be a multiple of processes"):
        TrainOptions(processes=3, batch_size=4)
    with pytest.raises(ValueError, match="at least 2 processes"):
        ProcessGroup(1, "cpu", [], parallel_targets.wait, ())


# -- real runs -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> None:
    splits = generate_dataset(
        tmp_path_factory.mktemp("shapes"), seed=3, splits={"train": 8, "val": 4}, image_size=(64, 64)
    )
    for name, paths in splits.items():
        register_coco_split(f"parallel_test_{name}", paths)


@pytest.mark.slow
def test_two_process_training_is_deterministic_and_evaluates_rank_0s_weights(
    shapes: None, tmp_path: Path
) -> None:
    cfg = tiny_instance_config(len(CATEGORIES), input_size=64)
    options = TrainOptions(
        max_iter=4, warmup_iters=1, batch_size=4, eval_period=2, num_workers=0, log_period=1, processes=2,
        device="cpu",
    )  # fmt: skip
    runs = [
        train(
            cfg,
            options,
            train_dataset="parallel_test_train",
            val_dataset="parallel_test_val",
            output_dir=tmp_path / str(i),
        )
        for i in range(2)
    ]
    losses = [[r["total_loss"] for r in run.history if "total_loss" in r] for run in runs]
    assert losses[0] == losses[1] and len(losses[0]) == 4
    assert [r["iteration"] for r in runs[0].history if "val/segm/AP" in r] == [2, 4]
    assert not dist.is_initialized()

    # The metric of the run, scored over both processes' shares, is that of rank 0's saved weights.
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    saved = get_cfg()
    saved.merge_from_file(str(tmp_path / "0" / "config.yaml"))
    model = build_model(saved)
    DetectionCheckpointer(model).load(str(runs[0].last_checkpoint))
    model.eval()
    final = [r for r in runs[0].history if "val/segm/AP" in r][-1]
    assert evaluate(saved, model, "parallel_test_val")["segm/AP"] == pytest.approx(final["val/segm/AP"])


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_two_gpu_training_runs(shapes: None, tmp_path: Path) -> None:
    cfg = tiny_instance_config(len(CATEGORIES), input_size=64)
    options = TrainOptions(
        max_iter=2, warmup_iters=1, batch_size=4, eval_period=2, num_workers=0, processes=2, device="cuda"
    )
    result = train(cfg, options, train_dataset="parallel_test_train", val_dataset="parallel_test_val",
                   output_dir=tmp_path)  # fmt: skip
    assert result.best_metric is not None and result.best_checkpoint.exists()
