"""``cvserve train`` run as a user runs it: a subprocess on a tiny generated dataset."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import pytest
import torch

from cvserve.models.data.synthetic import CATEGORIES, generate_dataset
from cvserve.models.instance.config import tiny_instance_config

ROOT = Path(__file__).resolve().parents[2]


def _cvserve(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        # Through main(), like the console script (``-m cvserve`` would make a second CLIError class).
        [sys.executable, "-m", "cvserve", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    root = tmp_path_factory.mktemp("train_cli")
    splits = generate_dataset(root / "shapes", seed=5, splits={"train": 8, "val": 3}, image_size=(64, 64))
    config = root / "tiny64.yaml"
    config.write_text(tiny_instance_config(len(CATEGORIES), input_size=64).dump(), encoding="utf-8")
    return splits, config


@pytest.mark.slow
def test_train_instance_writes_checkpoints_metrics_and_plot(data: tuple[dict, Path], tmp_path: Path) -> None:
    splits, config = data
    out = tmp_path / "run"
    proc = _cvserve(
        "train",
        "instance",
        "--train-json",
        str(splits["train"].instances_json),
        "--train-images",
        str(splits["train"].images),
        "--val-json",
        str(splits["val"].instances_json),
        "--val-images",
        str(splits["val"].images),
        "--config",
        str(config),
        "--out",
        str(out),
        "--fp16-checkpoint",
        "--max-iter",
        "4",
        "--warmup-iters",
        "2",
        "--batch-size",
        "2",
        "--eval-period",
        "2",
        "--log-period",
        "2",
        "--num-workers",
        "0",
        "--color-jitter",
        "0.2",
        "--noise-std",
        "4",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "iter 4/4" in proc.stderr  # progress lines
    assert "best checkpoint" in proc.stdout

    checkpoint = torch.load(out / "model_best.pth", weights_only=True)
    assert checkpoint["__cvserve__"]["class_names"] == list(CATEGORIES)
    assert checkpoint["__cvserve__"]["iteration"] in (2, 4)
    assert torch.load(out / "model_final.pth", weights_only=True)["__cvserve__"]["iteration"] == 4
    assert (out / "model_best_fp16.pth").stat().st_size < 0.6 * (out / "model_best.pth").stat().st_size

    with (out / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    train_rows = [r for r in rows if r["total_loss"]]
    eval_rows = [r for r in rows if r.get("val/segm/AP")]
    assert [int(r["iteration"]) for r in train_rows] == [1, 2, 3, 4]
    assert all(float(r["total_loss"]) > 0 and float(r["lr"]) > 0 for r in train_rows)
    assert [int(r["iteration"]) for r in eval_rows] == [2, 4]
    assert all(0 <= float(r["val/bbox/AP"]) <= 100 for r in eval_rows)

    summary = json.loads((out / "metrics.json").read_text())
    assert summary["summary"]["metric"] == "segm/AP"
    assert summary["summary"]["best_metric"] == max(float(r["val/segm/AP"]) for r in eval_rows)
    plot = cv2.imread(str(out / "metrics.png"))
    assert plot is not None and plot.shape[0] > 200 and plot.shape[1] > 400
    assert plot.std() > 10  # drawn, not blank


def test_missing_file_names_flag_and_path(data: tuple[dict, Path], tmp_path: Path) -> None:
    splits, _ = data
    missing = tmp_path / "nope.json"
    proc = _cvserve(
        "train",
        "instance",
        "--train-json",
        str(missing),
        "--train-images",
        str(splits["train"].images),
        "--out",
        str(tmp_path / "o"),
    )
    assert proc.returncode == 2
    assert f"--train-json {missing}: file does not exist" in proc.stderr
    proc = _cvserve(
        "train",
        "instance",
        "--train-json",
        str(splits["train"].instances_json),
        "--train-images",
        str(splits["train"].images),
        "--val-json",
        str(splits["val"].instances_json),
        "--out",
        str(tmp_path / "o"),
    )
    assert proc.returncode == 2
    assert "--val-json and --val-images must be given together" in proc.stderr


@pytest.mark.slow
def test_train_instance_on_two_processes(data: tuple[dict, Path], tmp_path: Path) -> None:
    splits, config = data
    out = tmp_path / "run"
    flags = {
        "--train-json": splits["train"].instances_json, "--train-images": splits["train"].images,
        "--val-json": splits["val"].instances_json, "--val-images": splits["val"].images,
        "--config": config, "--out": out, "--max-iter": 2, "--warmup-iters": 1, "--batch-size": 4,
        "--eval-period": 2, "--log-period": 1, "--num-workers": 0, "--processes": 2,
    }  # fmt: skip
    proc = _cvserve("train", "instance", *[str(x) for kv in flags.items() for x in kv])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "training on 2 processes (1 thread(s) each)" in proc.stderr
    with (out / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["iteration"]) for r in rows if r["total_loss"]] == [1, 2]
    assert [int(r["iteration"]) for r in rows if r.get("val/segm/AP")] == [2]
    assert torch.load(out / "model_final.pth", weights_only=True)["__cvserve__"]["iteration"] == 2


def test_invalid_option_is_reported(data: tuple[dict, Path], tmp_path: Path) -> None:
    splits, _ = data
    proc = _cvserve(
        "train",
        "instance",
        "--train-json",
        str(splits["train"].instances_json),
        "--train-images",
        str(splits["train"].images),
        "--out",
        str(tmp_path / "o"),
        "--num-workers",
        "5",
    )
    assert proc.returncode == 2
    assert "num_workers must be in [0, 2], got 5" in proc.stderr


def test_batch_not_shared_evenly_is_reported(data: tuple[dict, Path], tmp_path: Path) -> None:
    splits, _ = data
    proc = _cvserve(
        "train", "instance", "--train-json", str(splits["train"].instances_json),
        "--train-images", str(splits["train"].images), "--out", str(tmp_path / "o"),
        "--processes", "3", "--batch-size", "4",
    )  # fmt: skip
    assert proc.returncode == 2
    assert "batch_size must be a multiple of processes (3), got 4" in proc.stderr


def test_semantic_subcommand_is_wired() -> None:
    proc = _cvserve("train", "semantic", "--help")
    assert proc.returncode == 0
    assert "--out" in proc.stdout
