"""``train semantic`` end to end at toy scale: label folders or COCO JSON, transfer, errors."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
import yaml

from cvserve.cli import train_semantic
from cvserve.cli.common import CLIError
from cvserve.models.data.synthetic import CATEGORIES, generate_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("sem_data")
    return generate_dataset(root, seed=3, splits={"train": 4, "val": 2}, image_size=(64, 64))


@pytest.fixture(scope="module")
def detector(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised tiny Mask R-CNN checkpoint, as ``train`` would write it."""
    from detectron2.modeling import build_model

    from cvserve.models.checkpoint import save_checkpoint
    from cvserve.models.instance.config import tiny_instance_config

    cfg = tiny_instance_config(len(CATEGORIES), input_size=64)
    path = tmp_path_factory.mktemp("det") / "det.pth"
    save_checkpoint(build_model(cfg), path, extra={"class_names": list(CATEGORIES), "config": cfg.dump()})
    return path


def _run(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    train_semantic.add_arguments(parser)
    return train_semantic.run(parser.parse_args(list(argv)))


_FAST = (
    "--max-iter", "4", "--warmup-iters", "1", "--eval-period", "4",
    "--input-size", "64", "--num-workers", "0", "--batch-size", "2",
)  # fmt: skip


def test_label_folders_with_transfer(data: dict, detector: Path, tmp_path: Path, capsys) -> None:
    classes = ",".join(["background", *CATEGORIES])
    train, val = data["train"], data["val"]
    code = _run(
        "--train-images", str(train.images), "--train-labels", str(train.semantic_labels),
        "--val-images", str(val.images), "--val-labels", str(val.semantic_labels),
        "--classes", classes, "--encoder-from", str(detector), "--freeze", "res2",
        "--out", str(tmp_path), *_FAST,
    )  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "encoder transfer:" in out and "best validation mIoU" in out
    report = json.loads((tmp_path / "transfer_report.json").read_text())
    assert report["uninitialized_encoder_keys"] == [] and report["shape_mismatches"] == {}
    assert any(k.startswith("roi_heads.") for k in report["unused_checkpoint_keys"])
    meta = torch.load(tmp_path / "model_best.pth", weights_only=True)["__cvserve__"]
    assert meta["class_names"] == ["background", *CATEGORIES]
    assert (tmp_path / "metrics.csv").is_file()


@pytest.mark.slow
def test_coco_json_from_scratch(data: dict, tmp_path: Path) -> None:
    train = data["train"]
    code = _run(
        "--train-images", str(train.images), "--train-json", str(train.instances_json),
        "--class-weights", "balanced", "--out", str(tmp_path), *_FAST,
    )  # fmt: skip
    assert code == 0
    weights = yaml.safe_load((tmp_path / "config.yaml").read_text())["MODEL"]["SEMSEG"]["CLASS_WEIGHTS"]
    assert len(weights) == len(CATEGORIES) + 1
    assert weights[0] == min(weights) and weights[0] < weights[1] / 5  # background fills most pixels
    assert len(list((tmp_path / "labels" / "train").glob("*.png"))) == 4
    assert not (tmp_path / "transfer_report.json").exists()
    assert (tmp_path / "model_final.pth").is_file()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--train-images", "{images}", "--train-labels", "{labels}"], "--classes"),
        (["--train-images", "{missing}", "--train-labels", "{labels}", "--classes", "a,b"], "--train-images"),
        (["--train-images", "{images}", "--classes", "a,b"], "--train-labels"),
        (["--classes", "a,b"], "training data"),
        (["--train-images", "{images}", "--train-json", "{missing}"], "--train-json"),
        (
            ["--train-images", "{images}", "--train-labels", "{labels}", "--classes", "a,b",
             "--encoder-from", "{missing}"],
            "--encoder-from",
        ),
        (["--train-images", "{images}", "--train-labels", "{labels}", "--classes", "a,b", "--lr", "-1"], "lr"),
        (
            ["--train-images", "{images}", "--train-labels", "{labels}", "--classes", "a,b",
             "--class-weights", "1,2,3"],
            "--class-weights: 3 class weights for 2 classes",
        ),
        (
            ["--train-images", "{images}", "--train-labels", "{labels}", "--classes", "a,b",
             "--class-weights", "heavy"],
            "--class-weights: .*'balanced'",
        ),
        (
            ["--train-images", "{images}", "--train-labels", "{labels}", "--classes", "a,b",
             "--class-weights", "balanced", *_FAST],
            r"000000.png: label value \d is neither a class \(0..1\)",
        ),
    ],
)  # fmt: skip
def test_errors_name_the_flag(data: dict, tmp_path: Path, argv: list[str], message: str) -> None:
    values = {
        "images": str(data["train"].images),
        "labels": str(data["train"].semantic_labels),
        "missing": str(tmp_path / "missing"),
    }
    with pytest.raises(CLIError, match=message):
        _run(*[a.format(**values) for a in argv], "--out", str(tmp_path / "out"))


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ([1.0, 2.0], "needs 6 positive numbers"),
        ([1.0] * 5 + [0.0], "needs 6 positive numbers"),
        ("heavy", "'balanced'"),
    ],
)
def test_train_semantic_checks_class_weights_first(tmp_path: Path, weights: object, message: str) -> None:
    from cvserve.models.semseg.training import train_semantic
    from cvserve.models.training.options import TrainOptions

    with pytest.raises(ValueError, match=message):
        train_semantic(
            train_dataset="never_registered",
            val_dataset=None,
            num_classes=6,
            options=TrainOptions(max_iter=1, warmup_iters=0),
            output_dir=tmp_path,
            class_weights=weights,  # type: ignore[arg-type]
        )
    assert not any(tmp_path.iterdir())  # nothing written before the check
