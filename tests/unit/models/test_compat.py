"""The detectron2 compatibility layer: shims where needed, untouched elsewhere."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from cvserve.models import compat as _compat


def test_detectron2_imports_and_builds_a_model() -> None:
    from detectron2 import model_zoo
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) > 1_000_000


def test_model_zoo_configs_are_packaged() -> None:
    from detectron2 import model_zoo

    path = model_zoo.get_config_file("COCO-Detection/retinanet_R_50_FPN_1x.yaml")
    assert path.endswith("retinanet_R_50_FPN_1x.yaml")


def test_missing_native_op_names_the_op() -> None:
    if _compat.has_native_ops():
        pytest.skip("this detectron2 has its C++ extension")
    from detectron2 import _C

    with pytest.raises(_compat.MissingOpError, match=r"_C\.nms_rotated.*without its C\+\+"):
        _C.nms_rotated(None, None, 0.5)


def test_rotated_nms_fails_clearly_not_obscurely() -> None:
    if _compat.has_native_ops():
        pytest.skip("this detectron2 has its C++ extension")
    import torch
    from detectron2.layers import nms_rotated

    boxes = torch.tensor([[10.0, 10.0, 4.0, 4.0, 0.0]])
    with pytest.raises(_compat.MissingOpError, match="nms_rotated"):
        nms_rotated(boxes, torch.tensor([0.9]), 0.5)


def test_v06_numpy_and_pillow_names_work() -> None:
    # detectron2 v0.6's SemSegEvaluator uses np.int / np.float, removed from numpy.
    from detectron2.evaluation import SemSegEvaluator  # noqa: F401
    from PIL import Image

    assert np.zeros(2, dtype=np.int).dtype.kind == "i"  # type: ignore[attr-defined]
    assert Image.LINEAR == Image.BILINEAR  # type: ignore[attr-defined]


def test_nothing_patched_when_detectron2_source_does_not_need_it(tmp_path) -> None:
    # A stand-in for upstream detectron2 (no removed names in its source): apply() must
    # leave numpy and Pillow alone and must not shadow a real _C.
    pkg = tmp_path / "detectron2"
    (pkg / "evaluation").mkdir(parents=True)
    (pkg / "__init__.py").write_text("__version__ = '0.6'\n")
    (pkg / "_C.py").write_text("REAL = True\n")
    (pkg / "evaluation" / "sem_seg_evaluation.py").write_text("x = int\n")
    code = textwrap.dedent(
        """
        import sys
        sys.path.insert(0, sys.argv[1])
        import numpy as np
        from PIL import Image
        from cvserve.models import compat as _compat
        _compat.apply()
        from detectron2 import _C
        print(hasattr(np, "float"), hasattr(Image, "LINEAR"), getattr(_C, "REAL", False), _compat.has_native_ops())
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["False", "False", "True", "True"]


def test_apply_is_idempotent() -> None:
    before = len(sys.meta_path)
    _compat.apply()
    _compat.apply()
    assert len(sys.meta_path) == before


def test_map_dataset_falls_back_when_its_mapper_skips_an_item() -> None:
    """detectron2 v0.6's own TestMapDataset.test_map_style: random.sample on a set, refused by 3.11."""
    from detectron2.data.common import DatasetFromList, MapDataset

    def fresh() -> MapDataset:
        return MapDataset(DatasetFromList([1, 2, 3, None], copy=False), lambda x: x * 2 if x is not None else None)

    ds = fresh()
    assert (ds[0], ds[1], ds[2]) == (2, 4, 6)
    assert ds[3] in (2, 4, 6)  # the skipped item is replaced by one that maps
    assert [fresh()[3] for _ in range(3)] == [fresh()[3]] * 3  # the same seed picks the same item


def test_importing_cvserve_changes_nothing_until_apply() -> None:
    code = textwrap.dedent(
        """
        import sys, numpy as np
        finders = list(sys.meta_path)
        import cvserve, cvserve.models, cvserve.models.compat, cvserve.models.build, cvserve.client
        import cvserve.models.types, cvserve.models.repository, cvserve.models.registry
        from PIL import Image
        assert sys.meta_path == finders, sys.meta_path
        assert "int" not in np.__dict__ and not hasattr(Image, "LINEAR")
        assert "detectron2" not in sys.modules and "torch" not in sys.modules
        cvserve.models.compat.apply()
        assert len(sys.meta_path) > len(finders)
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
