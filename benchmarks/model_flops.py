"""How far a model's forward pass is from this machine's compute limit.

Counts the multiply-adds of one forward pass with fvcore's counter (the one detectron2
itself uses), times the same forward, and compares the achieved rate with a large
float32 matrix multiply measured in the same run on the same threads.

    python benchmarks/model_flops.py                      # R50-FPN Mask R-CNN, random weights
    python benchmarks/model_flops.py --model tiny         # the demo's tiny Mask R-CNN
    python benchmarks/model_flops.py --size 480 --threads 2

Prints a table; FLOPs here are 2 x multiply-adds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def build(kind: str, size: int) -> torch.nn.Module:
    from cvserve.models import compat

    compat.apply()  # detectron2 v0.6 needs it before its first import
    from detectron2 import model_zoo
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"))
    if kind == "tiny":
        from cvserve.models.instance.config import tiny_instance_config

        cfg = tiny_instance_config(5, input_size=size)
    cfg.MODEL.DEVICE = "cpu"
    cfg.INPUT.MIN_SIZE_TEST = size
    model = build_model(cfg).eval()
    return model


class _TensorForward(torch.nn.Module):
    """fvcore traces modules whose forward takes and returns tensors."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        (inst,) = self.model.inference([{"image": image}], do_postprocess=False)
        out = [inst.pred_boxes.tensor, inst.scores]
        if inst.has("pred_masks"):
            out.append(inst.pred_masks)
        return tuple(out)


def count_flops(model: torch.nn.Module, image: torch.Tensor) -> tuple[float, dict[str, float]]:
    from fvcore.nn import FlopCountAnalysis

    analysis = FlopCountAnalysis(_TensorForward(model), (image,))
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    by_module = analysis.by_module()
    parts = {k: by_module.get(f"model.{k}", 0) / 1e9 for k in ("backbone", "proposal_generator", "roi_heads")}
    return analysis.total() / 1e9, parts


def time_forward(model: torch.nn.Module, image: torch.Tensor, repeats: int) -> float:
    wrapper = _TensorForward(model)
    with torch.inference_mode():
        wrapper(image)  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            wrapper(image)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_gflops(n: int, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["r50", "tiny"], default="r50")
    parser.add_argument("--size", type=int, default=800, help="short side of the input (default: 800)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = build(args.model, args.size)
    h, w = args.size, int(args.size * 4 / 3)
    image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8).float()
    gmacs, parts = count_flops(model, image)
    seconds = time_forward(model, image, args.repeats)
    peak = max(matmul_gflops(n) for n in (1024, 2048, 4096))
    achieved = 2 * gmacs / seconds

    print(f"model {args.model}  input 3x{h}x{w}  threads {args.threads}")
    print(f"{'forward multiply-adds':34s} {gmacs:10.1f} G")
    for k, v in parts.items():
        print(f"{'  ' + k:34s} {v:10.1f} G")
    print(f"{'forward time (median)':34s} {seconds * 1000:10.1f} ms")
    print(f"{'achieved rate':34s} {achieved:10.1f} GFLOP/s")
    print(f"{'float32 matmul rate (best n)':34s} {peak:10.1f} GFLOP/s")
    print(f"{'fraction of matmul rate':34s} {achieved / peak:10.1%}")
    print(f"{'floor at matmul rate':34s} {2 * gmacs / peak * 1000:10.1f} ms")


if __name__ == "__main__":
    main()
