"""Resident memory of ``cvserve serve`` across reloads of a model: back to one copy each time?

Starts the server (a subprocess) on a detectron2 model with random weights, sends a few
Detect calls, then ``--reloads`` times: rewrites the checkpoint (new modification time, so
the entry changed), calls ``cvserve.v1`` ``LoadModel`` (the new load warms up beside the old
one, then the old one is freed), sends calls again and samples the server's RSS. Prints
RSS after each reload, the checkpoint's size and the peak (VmHWM), which includes the two
copies held during a swap.

    .venv/bin/python benchmarks/reload_memory.py               # R50-FPN Mask R-CNN (random weights)
    .venv/bin/python benchmarks/reload_memory.py --model tiny  # the demo's tiny config
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["r50", "tiny"], default="r50")
    parser.add_argument("--reloads", type=int, default=5)
    parser.add_argument("--requests", type=int, default=8, help="Detect calls after each reload (default: 8)")
    parser.add_argument("--size", type=int, default=160, help="square image side (default: 160)")
    args = parser.parse_args()

    import grpc

    from cvserve._proto.cvserve.v1 import vision_service_pb2 as pb
    from cvserve._proto.cvserve.v1 import vision_service_pb2_grpc as pb_grpc
    from cvserve.client.client import Client
    from cvserve.models import compat

    compat.apply()  # detectron2 v0.6 builds the random checkpoint below

    with tempfile.TemporaryDirectory(prefix="cvserve-reload-") as tmp:
        work = Path(tmp)
        model = _common.prepare_model(args.model, work)
        assert model.weights_path is not None
        checkpoint_mib = model.weights_path.stat().st_size / 2**20
        payloads = [_common.encode_jpeg(img) for img in _common.make_images(4, args.size, args.size)]
        print(f"machine: {_common.machine()}")
        print(f"model {model.name}, checkpoint {checkpoint_mib:.1f} MiB, weights {model.weights_note}")
        with (
            _common.serve([model.spec()], work, workers=2) as server,
            Client(server.address, timeout=120) as client,
        ):
            stub = pb_grpc.VisionServiceStub(grpc.insecure_channel(server.address))

            def calls() -> None:
                for i in range(args.requests):
                    client.detect_response(payloads[i % len(payloads)], model=model.name)

            calls()
            base = server.memory_kib()["VmRSS"]
            print(f"{'reload':>6s} {'seconds':>8s} {'RSS MiB':>8s} {'vs start':>9s}")
            print(f"{0:6d} {'':>8s} {base / 1024:8.1f} {0.0:9.1f}")
            for n in range(1, args.reloads + 1):
                now = time.time()
                os.utime(model.weights_path, (now, now))  # the checkpoint changed: a reload
                started = time.monotonic()
                stub.LoadModel(pb.LoadModelRequest(name=model.name), timeout=600)
                seconds = time.monotonic() - started
                calls()
                rss = server.memory_kib()["VmRSS"]
                print(f"{n:6d} {seconds:8.2f} {rss / 1024:8.1f} {(rss - base) / 1024:9.1f}", flush=True)
            peak = server.memory_kib()["VmHWM"] / 1024
        print(f"peak RSS (VmHWM): {peak:.0f} MiB (two copies of the model during each swap)")


if __name__ == "__main__":
    main()
