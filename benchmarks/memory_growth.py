"""Resident memory of ``cvserve serve`` over many requests: does it grow after warm-up?

Starts the server (a subprocess), warms it up, sends ``--requests`` Detect calls with
small images from a few client threads, samples the server's RSS along the way and
prints the growth from the post-warm-up sample. The target is < 50 MB over 2000 requests.

    .venv/bin/python benchmarks/memory_growth.py                 # the fake detector
    .venv/bin/python benchmarks/memory_growth.py --model demo --size 256   # the built demo detector
    .venv/bin/python benchmarks/memory_growth.py --model tiny    # its config, random weights
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common


def send(address: str, model: str, payloads: list[bytes], count: int, threads: int) -> None:
    """``count`` Detect calls spread over ``threads`` client threads."""
    from cvserve.client.client import Client

    def worker(n: int) -> None:
        with Client(address, timeout=120) as client:
            for i in range(n):
                client.detect_response(payloads[i % len(payloads)], model=model)

    share = [count // threads + (1 if i < count % threads else 0) for i in range(threads)]
    pool = [threading.Thread(target=worker, args=(n,)) for n in share]
    for t in pool:
        t.start()
    for t in pool:
        t.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["fake", "demo", "tiny"], default="fake")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--samples", type=int, default=10, help="RSS samples after warm-up (default: 10)")
    parser.add_argument("--size", type=int, default=96, help="square image side (default: 96)")
    parser.add_argument("--threads", type=int, default=4, help="client threads (default: 4)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="cvserve-mem-") as tmp:
        work = Path(tmp)
        if args.model == "fake":
            entry = _common.fake_spec(0)
            name = "fake"
        else:
            model = _common.prepare_model(args.model, work)
            entry, name = model.spec(), model.name
        images = _common.make_images(16, args.size, args.size, shapes=args.model == "demo")
        payloads = [_common.encode_jpeg(img) for img in images]
        print(f"machine: {_common.machine()}")
        with _common.serve([entry], work) as server:
            send(server.address, name, payloads, args.warmup, args.threads)
            base = server.memory_kib()["VmRSS"]
            print(f"model {name}, {args.size}x{args.size} JPEG, {args.threads} client threads")
            print(f"{'requests':>9s} {'RSS MiB':>9s} {'growth MiB':>11s}")
            print(f"{0:9d} {base / 1024:9.1f} {0.0:11.1f}")
            step, done = max(1, args.requests // args.samples), 0
            while done < args.requests:
                n = min(step, args.requests - done)
                send(server.address, name, payloads, n, args.threads)
                done += n
                rss = server.memory_kib()["VmRSS"]
                print(f"{done:9d} {rss / 1024:9.1f} {(rss - base) / 1024:11.1f}", flush=True)
            growth = (server.memory_kib()["VmRSS"] - base) / 1024
            peak = server.memory_kib()["VmHWM"] / 1024
        verdict = "within" if growth < 50 else "OVER"
        print(
            f"growth after warm-up: {growth:.1f} MiB over {args.requests} requests ({verdict} the 50 MB target)"
        )
        print(f"peak RSS (VmHWM): {peak:.0f} MiB")


if __name__ == "__main__":
    main()
