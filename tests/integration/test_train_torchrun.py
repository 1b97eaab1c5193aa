"""``cvserve train`` under ``torchrun``: the env:// rendezvous of multi-machine training, on the CPU.

``torchrun --nproc-per-node 2`` with a static rendezvous at ``--master-addr``/``--master-port``
starts two copies of the command, as it would on each of several machines; they join one
gloo process group and train together. The run must give what the built-in spawner
(``--processes 2``) gives on the same data and seed, since the training loop is the same.
"""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cvserve.models.data.synthetic import CATEGORIES, generate_dataset
from cvserve.models.instance.config import tiny_instance_config

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = Path(sys.executable).with_name("torchrun")
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed beside this Python"),
]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), str(ROOT)) if p)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def train_args(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    root = tmp_path_factory.mktemp("torchrun")
    splits = generate_dataset(root / "shapes", seed=5, splits={"train": 8, "val": 3}, image_size=(64, 64))
    config = root / "tiny64.yaml"
    config.write_text(tiny_instance_config(len(CATEGORIES), input_size=64).dump(), encoding="utf-8")
    return ["train", "instance",
            "--train-json", str(splits["train"].instances_json), "--train-images", str(splits["train"].images),
            "--val-json", str(splits["val"].instances_json), "--val-images", str(splits["val"].images),
            "--config", str(config), "--max-iter", "4", "--warmup-iters", "2", "--batch-size", "2",
            "--eval-period", "2", "--log-period", "1", "--num-workers", "0", "--seed", "3",
            "--device", "cpu"]  # fmt: skip


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300, check=False
    )


def _losses(out: Path) -> list[tuple[int, float, float]]:
    with (out / "metrics.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r["total_loss"]]
    return [(int(r["iteration"]), float(r["lr"]), float(r["total_loss"])) for r in rows]


def test_torchrun_trains_like_the_built_in_spawner(train_args: list[str], tmp_path: Path) -> None:
    launched, spawned = tmp_path / "torchrun", tmp_path / "spawned"
    rendezvous = ["--nnodes", "1", "--node-rank", "0", "--nproc-per-node", "2",
                  "--master-addr", "127.0.0.1", "--master-port", str(_free_port())]  # fmt: skip
    proc = _run([str(TORCHRUN), *rendezvous, "-m", "cvserve", *train_args, "--out", str(launched)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    for rank in (0, 1):
        assert f"rank {rank} of 2 (local rank {rank}) joined 127.0.0.1:" in proc.stderr
    assert proc.stdout.count("best checkpoint") == 1  # rank 0 reports, rank 1 stays quiet
    final = torch.load(launched / "model_final.pth", weights_only=True)
    assert final["__cvserve__"]["iteration"] == 4
    assert (launched / "model_best.pth").is_file() and (launched / "metrics.png").is_file()

    proc = _run([sys.executable, "-m", "cvserve", *train_args, "--processes", "2", "--out", str(spawned)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert [i for i, _, _ in _losses(launched)] == [1, 2, 3, 4]
    # Same seeds, shards, single-thread processes and gradient averaging: the same run.
    for (i, lr, loss), (_, lr_ref, loss_ref) in zip(_losses(launched), _losses(spawned), strict=True):
        assert lr == lr_ref and loss == pytest.approx(loss_ref, rel=1e-4), i
    reference = torch.load(spawned / "model_final.pth", weights_only=True)["model"]
    for name, tensor in final["model"].items():
        torch.testing.assert_close(tensor, reference[name], rtol=1e-4, atol=1e-5, msg=name)


def test_processes_under_torchrun_is_a_cli_error(train_args: list[str], tmp_path: Path) -> None:
    rendezvous = ["--nnodes", "1", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                  "--master-port", str(_free_port())]  # fmt: skip
    argv = [*train_args, "--processes", "2", "--out", str(tmp_path / "o")]
    proc = _run([str(TORCHRUN), *rendezvous, "-m", "cvserve", *argv])
    assert proc.returncode != 0
    assert "under a launcher (WORLD_SIZE=2) the launcher starts them: leave processes at 1" in proc.stderr
