"""``cvserve health``: ask a server's standard ``grpc.health.v1`` service (for probes)."""

from __future__ import annotations

import argparse

HELP = "check a server through the standard gRPC health service (exit 0 when SERVING)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", default="127.0.0.1:8001", help="server address (default: %(default)s)")
    parser.add_argument("--service", default="", help="service or model name to check (default: the server)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait (default: %(default)s)")
    parser.add_argument("--tls-ca", help="PEM file of the CA that signed the server certificate")


def run(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from cvserve.cli.common import CLIError

    if args.tls_ca:
        try:
            with open(args.tls_ca, "rb") as f:
                creds = grpc.ssl_channel_credentials(root_certificates=f.read())
        except OSError as e:
            raise CLIError(f"{args.tls_ca}: cannot read --tls-ca: {e.strerror}") from None
        channel = grpc.secure_channel(args.server, creds)
    else:
        channel = grpc.insecure_channel(args.server)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
        except grpc.RpcError as e:
            print(f"{args.server}: {e.code().name}: {e.details()}")
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{args.server} {args.service or '(server)'}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1
