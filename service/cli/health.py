"""``cvserve health``: ask a server's standard ``grpc.health.v1`` service (for probes)."""

from __future__ import annotations

import argparse

from cvserve.cli.connection import add_connection_arguments, connection_from_args

HELP = "check a server through the standard gRPC health service (exit 0 when SERVING)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--service", default="", help="service or model name to check (default: the server)")
    add_connection_arguments(parser, timeout_default=3.0)


def run(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    connection = connection_from_args(args)
    with connection.channel() as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service=args.service)
        try:
            # The token too: a server started with --auth-health requires it on health checks.
            reply = stub.Check(request, timeout=connection.timeout, metadata=connection.metadata)
        except grpc.RpcError as e:
            print(f"{args.server}: {e.code().name}: {e.details()}")
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{args.server} {args.service or '(server)'}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1
