"""``cvserve info``: versions, devices and the model repository in use."""

from __future__ import annotations

import argparse
import json
import platform
from importlib import metadata
from typing import Any

HELP = "print versions of the runtime, CUDA devices, CPU bf16 support and the model repository in use"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", help="model repository YAML (default: the demo repository)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def collect(models: str | None = None) -> dict[str, Any]:
    """Gather the facts ``cvserve info`` prints."""
    import grpc
    import torch
    import torchvision

    from cvserve.models import compat as _compat
    from cvserve.models.device import cuda_status
    from cvserve.models.paths import default_repository_path
    from cvserve.models.precision import cpu_bf16, resolve_precision

    _compat.apply()
    import detectron2

    from cvserve.models.instance.nhwc_roi_align import describe as roi_align_kernel

    cuda = cuda_status()
    devices = []
    if cuda.available:
        for i in range(cuda.device_count):
            props = torch.cuda.get_device_properties(i)
            devices.append(
                {"index": i, "name": props.name, "memory_gib": round(props.total_memory / 2**30, 2)}
            )
    dist = "pb1-detectron2" if _version("pb1-detectron2") else "detectron2"
    repo = models or str(default_repository_path())
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda_build": torch.version.cuda,
        "torchvision": torchvision.__version__,
        "detectron2": detectron2.__version__,
        "detectron2_distribution": dist,
        "detectron2_native_ops": _compat.has_native_ops(),
        "cuda_available": cuda.available,
        "cuda_devices": devices,
        "nvidia_driver": cuda.driver,
        "cuda_problem": cuda.problem,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_bf16": {
            "native": cpu_bf16().native,
            "flags": list(cpu_bf16().flags),
            "source": cpu_bf16().source,
        },
        "auto_precision": {
            "cpu": resolve_precision("auto", "cpu"),
            "cuda": resolve_precision("auto", "cuda"),
        },
        "cpu_roi_align": roi_align_kernel(),
        "grpcio": grpc.__version__,
        "model_repository": repo,
    }


def run(args: argparse.Namespace) -> int:
    info = collect(args.models)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    build = "with C++ ops (_C)" if info["detectron2_native_ops"] else "pure Python, without C++ ops (_C)"
    cuda = "yes" if info["cuda_available"] else "no"
    if info["cuda_problem"]:
        cuda = f"no: CUDA present but unusable ({info['cuda_problem']})"
    elif info["nvidia_driver"]:
        cuda += f" (NVIDIA driver {info['nvidia_driver']})"
    print(f"python       {info['python']} ({info['platform']})")
    print(f"torch        {info['torch']} (built for CUDA {info['torch_cuda_build']})")
    print(f"torchvision  {info['torchvision']}")
    print(f"detectron2   {info['detectron2']} [{info['detectron2_distribution']}], {build}")
    print(f"CUDA         {cuda}")
    for d in info["cuda_devices"]:
        print(f"  cuda:{d['index']}  {d['name']}  {d['memory_gib']} GiB")
    bf16 = info["cpu_bf16"]
    native = f"native ({', '.join(bf16['flags']) or 'yes'})" if bf16["native"] else "not native"
    auto = info["auto_precision"]
    print(f"CPU          {info['cpu_capability']}, bf16 {native}, from {bf16['source']}")
    print(f"precision    auto = {auto['cpu']} on the CPU, {auto['cuda']} on CUDA")
    print(f"RoIAlign     on the CPU: {info['cpu_roi_align']}")
    print(f"grpcio       {info['grpcio']}")
    print(f"models       {info['model_repository']}")
    return 0
