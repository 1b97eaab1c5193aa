"""The demo model repository, built from nothing on the machine that serves it.

Pipeline (deterministic for a seed): synthetic shapes dataset (train/val/test) ->
tiny Mask R-CNN trained from scratch -> semantic segmenter whose encoder is transferred
from that detector and fine-tuned -> checkpoints stored in fp16 when that costs no
accuracy on the test split -> evaluation on the held-out test split (bbox/segm AP,
mIoU) -> ``report.json`` and ``models.yaml``.

Layout of the result::

    <out>/models.yaml                 shapes-maskrcnn (instance), shapes-semseg (semantic)
    <out>/report.json                 test-split figures, precision checks, timings
    <out>/instance/{config.yaml,model.pth,training/}
    <out>/semantic/{config.yaml,model.pth,training/}
    <out>/data/test/                  the held-out split the figures come from

Everything is built in a sibling temporary directory renamed into place at the end,
so an interrupted build never leaves a directory that looks complete.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import yaml

from cvserve.models.demo.scale import DemoScale
from cvserve.models.demo.stages import DemoBuild, Progress, run_pipeline

__all__ = [
    "DEMO_SCALE",
    "DemoScale",
    "build_demo_repository",
    "ensure_demo_repository",
    "read_report",
    "toy_scale",
]

logger = logging.getLogger(__name__)

INSTANCE_NAME = "shapes-maskrcnn"
SEMANTIC_NAME = "shapes-semseg"
DEMO_SCALE = DemoScale()


def _write_repository_file(root: Path) -> None:
    # max_batch_size auto: the server measures at load which batch size is fastest per image
    # on its device. instances auto: on a CPU, one forward pass per core at once, sharing the
    # cores' threads (1.4-1.6x the throughput of one pass on both cores for this detector).
    common = {
        "device": "auto",
        "precision": "auto",  # bf16 on CPUs with native bf16 where the build measured <= 0.3 points lost
        "max_batch_size": "auto",
        "max_wait_ms": 5.0,
        "instances": "auto",
    }
    entries = [
        {
            "name": name,
            "task": part,
            "config": f"{part}/config.yaml",
            "weights": f"{part}/model.pth",
            **common,
        }
        for name, part in ((INSTANCE_NAME, "instance"), (SEMANTIC_NAME, "semantic"))
    ]
    text = "# Built by `cvserve demo build`; see report.json for test-split figures.\n"
    (root / "models.yaml").write_text(text + yaml.safe_dump({"models": entries}, sort_keys=False))


def _environment() -> dict[str, Any]:
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "cpu_count": os.cpu_count(),
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
    }


def build_demo_repository(
    out_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    progress: Progress = print,
    force: bool = False,
    scale: DemoScale = DEMO_SCALE,
) -> Path:
    """Build the demo repository into ``out_dir`` and return the path of its ``models.yaml``.

    Args:
        out_dir: the repository directory to create.
        seed: seed of the dataset and of every training run.
        progress: receives one line per stage (training progress goes to logging).
        force: replace an existing ``out_dir``.
        scale: dataset and training sizes.

    Raises:
        FileExistsError: ``out_dir`` exists and ``force`` is False.
    """
    out = Path(out_dir).resolve()
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists (use force to rebuild)")
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(out)
    work = out.parent / f".{out.name}.building-{os.getpid()}"
    work.mkdir()
    start = time.perf_counter()
    build = DemoBuild(
        work, seed, scale, progress, {}, {"environment": _environment(), "scale": asdict(scale)}
    )
    try:
        run_pipeline(build)
        build.report["environment"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
        build.report["build_seconds"] = round(time.perf_counter() - start, 1)
        (work / "report.json").write_text(json.dumps(build.report, indent=2), encoding="utf-8")
        _write_repository_file(work)  # last: its presence marks a complete repository
        _swap_into_place(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    progress(f"[demo] repository ready in {build.report['build_seconds']:.0f} s: {out / 'models.yaml'}")
    return out / "models.yaml"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_builds(out: Path) -> None:
    """Delete temporary directories of builds whose process is gone (killed, not interrupted)."""
    for stale in out.parent.glob(f".{out.name}.*-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if stale.is_dir() and pid.isdigit() and (int(pid) == os.getpid() or not _pid_alive(int(pid))):
            logger.info("removing %s, left by an earlier build that did not finish", stale)
            shutil.rmtree(stale, ignore_errors=True)


def _swap_into_place(work: Path, out: Path) -> None:
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)
    work.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def ensure_demo_repository(path: str | os.PathLike[str] | None = None, progress: Progress = print) -> Path:
    """Return the demo repository's ``models.yaml``, building the repository first if it is missing.

    Args:
        path: the ``models.yaml`` path; default ``cvserve.models.paths.default_repository_path()``.
        progress: receives progress lines while building.

    Raises:
        FileExistsError: the directory exists, is not empty and has no ``models.yaml``
            (it is not ours to replace).
    """
    from cvserve.models.paths import default_repository_path

    yaml_path = Path(path) if path is not None else default_repository_path()
    if yaml_path.is_file():
        return yaml_path
    directory = yaml_path.parent
    if directory.exists() and any(directory.iterdir()):
        raise FileExistsError(f"{directory} exists without models.yaml; remove it or pick another directory")
    progress(f"[demo] no model repository at {yaml_path}: building the demo repository (several minutes)")
    return build_demo_repository(directory, progress=progress, force=directory.exists())


def read_report(repository_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``report.json`` of a built demo repository.

    Raises:
        FileNotFoundError: no report (the repository was not built by this module).
    """
    path = Path(repository_dir) / "report.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no demo report (build it with `cvserve demo build`)")
    return dict(json.loads(path.read_text(encoding="utf-8")))


def toy_scale() -> DemoScale:
    """A seconds-long scale for tests of the pipeline's plumbing (the models learn nothing)."""
    return replace(
        DEMO_SCALE,
        train_images=6,
        val_images=2,
        test_images=2,
        image_size=64,
        instance_train_sizes=(48, 64),
        instance_test_size=64,
        semantic_input_size=64,
        instance_iters=4,
        instance_eval_period=4,
        semantic_iters=4,
        semantic_eval_period=4,
        instance_batch_size=2,
        processes=1,
        num_workers=0,
    )
