"""COCO AP of the served demo detector on phone-sized JPEGs: reduced-scale decoding against full.

A JPEG larger than the model's input is decoded at 1/2, 1/4 or 1/8 scale by default
(``cvserve serve``; ``--full-decode`` turns it off). This measures what that does to accuracy:
the synthetic shapes' test split is rendered at phone size (objects scale with the image),
saved as JPEG, and evaluated through ``cvserve eval --server`` against two servers, one on
its defaults and one with ``--full-decode``. The images travel as JPEG bytes, so each server
decodes them its own way.

    CVSERVE_DEMO_DIR=... .venv/bin/python benchmarks/scaled_decode_ap.py --images 32

Needs the built demo repository (``cvserve demo build``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common


def _jpeg_split(root: Path, images: int, size: tuple[int, int], quality: int, seed: int) -> tuple[Path, Path]:
    """The synthetic test split at ``size``, its PNGs re-saved as JPEGs: ``(instances.json, images dir)``."""
    import cv2

    from cvserve.models.data.synthetic import generate_dataset

    paths = generate_dataset(root, seed=seed, splits={"test": images}, image_size=size)["test"]
    jpegs = root / "jpeg"
    jpegs.mkdir()
    gt = json.loads(paths.instances_json.read_text())
    for entry in gt["images"]:
        png = paths.images / entry["file_name"]
        entry["file_name"] = png.with_suffix(".jpg").name
        cv2.imwrite(
            str(jpegs / entry["file_name"]), cv2.imread(str(png)), [cv2.IMWRITE_JPEG_QUALITY, quality]
        )
        png.unlink()
    out = root / "instances_jpeg.json"
    out.write_text(json.dumps(gt))
    return out, jpegs


def _evaluate(server: _common.ServerProcess, name: str, gt: Path, images: Path, out: Path) -> dict[str, Any]:
    command = [sys.executable, "-m", "cvserve", "eval", "--model", name, "--server", server.address]
    command += ["--gt", str(gt), "--images", str(images), "--out", str(out), "--no-plots"]
    subprocess.run(command, check=True, cwd=_common.ROOT, stdout=subprocess.DEVNULL)
    report = json.loads((out / "report.json").read_text())
    return dict(report["metrics"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--size", type=int, nargs=2, default=(3024, 4032), metavar=("H", "W"))
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality (default 90)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    print(_common.machine())
    with tempfile.TemporaryDirectory(prefix="cvserve-scaled-ap-") as tmp:
        work = Path(tmp)
        model = _common.prepare_model("demo", work)
        entry = {
            **model.spec(max_batch_size="auto", instances="auto"),
            "options": {"class_names": model.options["class_names"]},
        }
        start = time.perf_counter()
        gt, images = _jpeg_split(work / "data", args.images, tuple(args.size), args.quality, args.seed)
        print(
            f"{args.images} test images at {args.size[1]}x{args.size[0]}, JPEG q{args.quality}, written in "
            f"{time.perf_counter() - start:.0f} s; model {model.weights_note}"
        )
        rows = {}
        for label, flags in (("scaled (default)", ()), ("full (--full-decode)", ("--full-decode",))):
            run = work / label.split()[0]
            run.mkdir()
            with _common.serve([entry], run, flags=flags) as server:
                start = time.perf_counter()
                rows[label] = _evaluate(server, model.name, gt, images, run / "eval")
                rows[label]["_seconds"] = time.perf_counter() - start
        print("\n| decoding | bbox AP | bbox AP50 | segm AP | segm AP50 | eval wall time |")
        print("|---|---|---|---|---|---|")
        for label, m in rows.items():
            box, segm = m["bbox"]["stats"], m["segm"]["stats"]
            print(
                f"| {label} | {100 * box['AP']:.2f} | {100 * box['AP50']:.2f} | {100 * segm['AP']:.2f} | "
                f"{100 * segm['AP50']:.2f} | {m['_seconds']:.0f} s |"
            )
        (full, scaled) = rows["full (--full-decode)"], rows["scaled (default)"]
        for kind in ("bbox", "segm"):
            print(
                f"{kind} AP difference, scaled - full: {100 * (scaled[kind]['stats']['AP'] - full[kind]['stats']['AP']):+.2f} points"
            )


if __name__ == "__main__":
    main()
