"""One request at a time against fresh servers: latency, page faults and CPU per request.

For each ``--max-batch-size`` value (repeat them to alternate), starts ``cvserve serve`` on
the model, sends a few requests to settle, then ``--requests`` sequential detection
requests (JPEG, masks as RLE) from one client, and prints the client's p50 latency, the
server's minor page faults per request, and the CPU time per request of the client process
and of the server process (from ``/proc``; Linux only). The warm-up a server runs at load
sends ``max_batch_size`` images at once, so the values differ in what the server did before
the first request. ``--server-flag`` passes extra ``cvserve serve`` flags (``--no-warmup``).

    .venv/bin/python benchmarks/lone_requests.py --max-batch-size 1 8 1 8
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common


def _proc_stat(pid: int) -> tuple[int, int]:
    """(minor faults, CPU clock ticks in user and system mode) of a process."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[7]), int(fields[11]) + int(fields[12])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=["demo", "tiny", "r50"], default="demo")
    parser.add_argument("--max-batch-size", nargs="+", default=["1", "8"], help="one fresh server per value")
    parser.add_argument("--instances", default="auto")
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--server-flag", action="append", default=[], help="extra `cvserve serve` flag")
    args = parser.parse_args()
    from cvserve.client.client import Client

    print(_common.machine())
    tick_ms = 1000 / os.sysconf("SC_CLK_TCK")
    with tempfile.TemporaryDirectory(prefix="cvserve-lone-") as tmp:
        model = _common.prepare_model(args.model, Path(tmp))
        payloads = [_common.encode_jpeg(image) for image in _common.make_images(8, 480, 640, shapes=True)]
        print(f"model {args.model} ({model.weights_note}), {args.requests} sequential requests per server, "
              f"flags {args.server_flag or 'none'}")  # fmt: skip
        for value in args.max_batch_size:
            batch = value if value == "auto" else int(value)
            instances = args.instances if args.instances == "auto" else int(args.instances)
            with _common.serve(
                [model.spec(batch, 0.0, instances)], Path(tmp), flags=args.server_flag
            ) as server:
                client = Client(server.address, timeout=600)
                for payload in payloads:  # settle
                    client.detect_response(payload, model=model.name)
                faults, ticks = _proc_stat(server.process.pid)
                cpu = time.process_time()
                latencies = []
                for i in range(args.requests):
                    start = time.perf_counter()
                    client.detect_response(payloads[i % len(payloads)], model=model.name)
                    latencies.append(1000 * (time.perf_counter() - start))
                client_ms = 1000 * (time.process_time() - cpu) / args.requests
                faults_after, ticks_after = _proc_stat(server.process.pid)
                n = args.requests
                print(f"max_batch_size {value}: p50 {statistics.median(latencies):.1f} ms, "
                      f"server minor faults {(faults_after - faults) / n:.0f}, CPU ms per request: "
                      f"client {client_ms:.1f}, server {(ticks_after - ticks) * tick_ms / n:.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
