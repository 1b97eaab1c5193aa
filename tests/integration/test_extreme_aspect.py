"""Extreme aspect ratios (line scans, panorama strips) through every way of running a real model.

Tiny random-weight detectron2 models of both tasks: a 3000x1 and a 1x12000 PNG get a
prediction at their own size through cvserve.v1 and the Open Inference Protocol, in
annotate and in eval; with a test size that has no useful ``max_size_test`` the same
images exceed ``max_input_pixels``, which every path reports as the image's fault,
naming the limit.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from detectron2.data import transforms as T
from PIL import Image

from cvserve.cli.main import main
from cvserve.client.client import Client, ClientError
from cvserve.config import ServerConfig
from cvserve.kserve.servicer import add_kserve_servicer
from cvserve.models.instance.config import tiny_instance_config
from cvserve.models.repository import load_repository
from cvserve.models.semseg import semseg_config
from cvserve.server.build import ServerThread

tc = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

SHAPES = {"line": (1, 3000), "strip": (12000, 1)}  # (height, width)
UNBOUNDED = {"max_size_test": 1_000_000, "max_input_pixels": 100_000}
LIMIT = "more than its limit max_input_pixels = 100000"
MODELS = {"det": "instance", "seg": "semantic", "det-wide": "instance", "seg-wide": "semantic"}
INSTANCE_NAMES = ["circle", "square", "triangle"]
SEMANTIC_NAMES = ["background", "circle", "square", "triangle"]

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def image(shape: str) -> np.ndarray:
    height, width = SHAPES[shape]
    rng = np.random.default_rng(height)
    return rng.integers(0, 255, (height, width, 3), dtype=np.uint8)


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    det = tiny_instance_config(len(INSTANCE_NAMES), input_size=64)
    det.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0  # random weights score low; keep everything
    (root / "det.yaml").write_text(det.dump())
    (root / "seg.yaml").write_text(
        semseg_config(len(SEMANTIC_NAMES), backbone_from=None, input_size=64).dump()
    )
    entries = []
    for name, task in MODELS.items():
        names = INSTANCE_NAMES if task == "instance" else SEMANTIC_NAMES
        options = {"class_names": names, **(UNBOUNDED if name.endswith("-wide") else {})}
        config = "det.yaml" if task == "instance" else "seg.yaml"
        entries.append({"name": name, "task": task, "config": config, "device": "cpu", "options": options})
    (root / "models.yaml").write_text(yaml.safe_dump({"models": entries}))
    return root / "models.yaml"


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[ServerThread]:
    torch.manual_seed(0)
    config = ServerConfig(port=0, metrics_port=None, worker_threads=2, warmup=False)
    specs = load_repository(repo)
    with ServerThread(config, specs, servicers=[add_kserve_servicer]).start(wait_loaded=True) as srv:
        yield srv


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The two images, COCO ground truth for them and semantic label PNGs."""
    root = tmp_path_factory.mktemp("data")
    (root / "images").mkdir()
    (root / "labels").mkdir()
    gt: dict = {"images": [], "annotations": [], "categories": []}
    for i, name in enumerate(INSTANCE_NAMES, start=1):
        gt["categories"].append({"id": i, "name": name})
    for i, shape in enumerate(SHAPES, start=1):
        (root / "images" / f"{shape}.png").write_bytes(png(image(shape)))
        height, width = SHAPES[shape]
        labels = np.zeros((height, width), np.uint8)
        labels[: max(1, height // 2), : max(1, width // 2)] = 1
        Image.fromarray(labels).save(root / "labels" / f"{shape}.png")
        gt["images"].append({"id": i, "file_name": f"{shape}.png", "height": height, "width": width})
        box = [0.0, 0.0, float(max(1, width // 2)), float(max(1, height // 2))]
        polygon = [0.0, 0.0, box[2], 0.0, box[2], box[3], 0.0, box[3]]
        gt["annotations"].append({"id": i, "image_id": i, "category_id": 1, "bbox": box, "iscrowd": 0,
                                  "area": box[2] * box[3], "segmentation": [polygon]})  # fmt: skip
    (root / "gt.json").write_text(json.dumps(gt))
    return root


def test_detectron2_alone_cannot_resize_these_images() -> None:
    for height, width in SHAPES.values():
        assert 0 in T.ResizeShortestEdge.get_output_shape(height, width, 64, 107)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("model", ["det", "seg"])
def test_cvserve_v1_predicts_at_the_images_size(server: ServerThread, model: str, shape: str) -> None:
    with Client(server.address, timeout=120) as client:
        prediction = client.predict(png(image(shape)), model=model)
    assert tuple(prediction.image_size) == SHAPES[shape]
    if model == "seg":
        assert prediction.semantic is not None and prediction.semantic.labels.shape == SHAPES[shape]
    else:
        assert prediction.instances  # random weights, score threshold 0: there are detections
        height, width = SHAPES[shape]
        for inst in prediction.instances:
            assert 0 <= inst.box[0] <= inst.box[2] <= width and 0 <= inst.box[1] <= inst.box[3] <= height
            assert inst.mask is not None and tuple(inst.mask.size) == SHAPES[shape]


def _infer(server: ServerThread, model: str, data: bytes) -> tc.InferResult:
    triton = tc.InferenceServerClient(server.address)
    try:
        tensor = tc.InferInput("image", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([data], dtype=np.object_))
        return triton.infer(model, [tensor], client_timeout=120)
    finally:
        triton.close()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("model", ["det", "seg"])
def test_open_inference_protocol_predicts_at_the_images_size(
    server: ServerThread, model: str, shape: str
) -> None:
    result = _infer(server, model, png(image(shape)))
    assert result.as_numpy("image_size").tolist() == list(SHAPES[shape])
    if model == "seg":
        assert result.as_numpy("labels").shape == SHAPES[shape]
    else:
        assert result.as_numpy("boxes").shape[-1] == 4 and result.as_numpy("num_detections") > 0


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("model", ["det-wide", "seg-wide"])
def test_over_the_input_limit_is_invalid_argument_in_both_apis(
    server: ServerThread, model: str, shape: str
) -> None:
    with Client(server.address, timeout=60) as client, pytest.raises(ClientError) as info:
        client.predict(png(image(shape)), model=model)
    assert info.value.code.name == "INVALID_ARGUMENT" and LIMIT in info.value.message
    with pytest.raises(InferenceServerException) as kserve:
        _infer(server, model, png(image(shape)))
    assert kserve.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert kserve.value.message() == info.value.message  # the same message in both APIs


@pytest.mark.parametrize("where", ["server", "in-process"])
@pytest.mark.parametrize("model", ["det", "seg", "det-wide", "seg-wide"])
def test_annotate_predicts_or_writes_an_errors_entry(
    server: ServerThread, repo: Path, dataset: Path, tmp_path: Path, model: str, where: str
) -> None:
    out = tmp_path / "results.json"
    via = ["--server", server.address] if where == "server" else ["--models", str(repo)]
    assert (
        main(["annotate", str(dataset / "images"), "--model", model, *via, "--out", str(out), "--quiet"]) == 0
    )
    errors = json.loads((tmp_path / "results.errors.json").read_text())
    images = json.loads((tmp_path / "results.images.json").read_text())
    if model.endswith("-wide"):
        assert sorted(Path(e["path"]).name for e in errors) == ["line.png", "strip.png"]
        assert all(LIMIT in e["reason"] for e in errors)
    else:
        assert errors == []
        assert sorted(i["file_name"] for i in images["images"]) == ["line.png", "strip.png"]


def _eval_args(
    model: str, where: str, server: ServerThread, repo: Path, dataset: Path, out: Path
) -> list[str]:
    via = ["--server", server.address] if where == "server" else ["--models", str(repo)]
    task = (
        ["--gt", str(dataset / "gt.json")]
        if model.startswith("det")
        else ["--labels", str(dataset / "labels")]
    )
    return ["eval", "--model", model, *via, "--images", str(dataset / "images"), *task,
            "--out", str(out), "--no-plots"]  # fmt: skip


@pytest.mark.parametrize("where", ["server", "in-process"])
@pytest.mark.parametrize("model", ["det", "seg"])
def test_eval_runs_over_extreme_images(
    server: ServerThread, repo: Path, dataset: Path, tmp_path: Path, model: str, where: str
) -> None:
    out = tmp_path / "report"
    assert main(_eval_args(model, where, server, repo, dataset, out)) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["num_images"] == 2
    if model == "det":
        results = json.loads((out / "results.json").read_text())
        assert {r["image_id"] for r in results} == {1, 2}


@pytest.mark.parametrize("where", ["server", "in-process"])
@pytest.mark.parametrize("model", ["det-wide", "seg-wide"])
def test_eval_over_the_input_limit_names_file_and_limit(
    server: ServerThread,
    repo: Path,
    dataset: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    model: str,
    where: str,
) -> None:
    assert main(_eval_args(model, where, server, repo, dataset, tmp_path / "report")) == 2
    err = capsys.readouterr().err
    assert ".png: " in err and LIMIT in err
