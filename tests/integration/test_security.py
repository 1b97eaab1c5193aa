"""Security: TLS and mutual TLS, bearer tokens on every service, paths clients cannot reach,
logs without secrets, and the ``cvserve serve`` flags that turn it all on.

Certificates are made per test with the ``openssl`` command: a CA, a server and a
client certificate it signs, and a rogue CA with its own client certificate.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cvserve._proto.cvserve.v1 import types_pb2 as types_pb
from cvserve._proto.cvserve.v1 import vision_service_pb2 as pb
from cvserve._proto.cvserve.v1 import vision_service_pb2_grpc as pb_grpc
from cvserve._proto.inference import grpc_service_pb2 as kpb
from cvserve.client.client import Client, ClientError
from cvserve.config import ServerConfig
from cvserve.kserve.servicer import add_kserve_servicer
from cvserve.models.repository import load_repository
from cvserve.server.auth import CredentialFileError, read_token_file
from cvserve.server.build import ServerThread
from tests.integration.test_reliability_faults import serve_cli, wait_ready
from tests.integration.test_server_ops import ROOT, red, write_repository

tc = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
TOKEN = "tok-" + "7f3a9c1e5b2d4086" * 2
MODELS = [{"name": "det", "task": "instance"}, {"name": "seg", "task": "semantic"}]
SERVING = health_pb2.HealthCheckResponse.SERVING


# ---- certificates ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: bytes
    server: tuple[Path, Path]  # certificate, key
    client: tuple[bytes, bytes]  # certificate chain, key
    rogue_client: tuple[bytes, bytes]
    ca_path: Path


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def _key_and_csr(directory: Path, name: str, subject: str) -> tuple[Path, Path]:
    key, csr = directory / f"{name}.key", directory / f"{name}.csr"
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-subj", subject, "-keyout", str(key), "-out", str(csr))  # fmt: skip
    return key, csr


def _ca(directory: Path, name: str) -> tuple[Path, Path]:
    key, cert = directory / f"{name}.key", directory / f"{name}.pem"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1",
             "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", "-keyout", str(key), "-out", str(cert))  # fmt: skip
    return cert, key


def _sign(directory: Path, name: str, ca: tuple[Path, Path], extensions: str) -> tuple[Path, Path]:
    key, csr = _key_and_csr(directory, name, f"/CN={name}")
    ext, cert = directory / f"{name}.ext", directory / f"{name}.pem"
    ext.write_text(extensions)
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-CAcreateserial",
             "-days", "1", "-extfile", str(ext), "-out", str(cert))  # fmt: skip
    return cert, key


def make_pki(directory: Path) -> Pki:
    ca, rogue_ca = _ca(directory, "test-ca"), _ca(directory, "rogue-ca")
    server = _sign(
        directory, "server", ca, "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"
    )
    client = _sign(directory, "client", ca, "extendedKeyUsage=clientAuth\n")
    rogue = _sign(directory, "rogue", rogue_ca, "extendedKeyUsage=clientAuth\n")
    pair = lambda cert_key: (cert_key[0].read_bytes(), cert_key[1].read_bytes())  # noqa: E731
    return Pki(ca[0].read_bytes(), server, pair(client), pair(rogue), ca[0])


# ---- servers -----------------------------------------------------------------------------------


def in_process(directory: Path, **config: object) -> ServerThread:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    specs = load_repository(write_repository(directory, MODELS))
    settings = ServerConfig(**{"port": 0, "metrics_port": None, "worker_threads": 2, **config})
    return ServerThread(settings, specs, servicers=[add_kserve_servicer]).start(wait_loaded=True)


def health(channel: grpc.Channel, metadata: tuple[tuple[str, str], ...] = ()) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(), timeout=5, metadata=metadata).status


# ---- TLS ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@needs_openssl
class TestMutualTLS:
    def test_tls_without_client_ca_serves_any_verified_channel(self, pki: Pki, tmp_path: Path) -> None:
        cert, key = pki.server
        with in_process(tmp_path, tls_cert_file=str(cert), tls_key_file=str(key)) as srv:
            with Client(f"localhost:{srv.port}", timeout=5, root_certificates=pki.ca) as client:
                assert client.detect(red(), model="det").instances
            with Client(srv.address, timeout=2) as plaintext, pytest.raises(ClientError) as info:
                plaintext.list_models()
            assert info.value.code is grpc.StatusCode.UNAVAILABLE

    def test_mutual_tls_admits_only_clients_with_a_certificate_the_ca_signed(
        self, pki: Pki, tmp_path: Path
    ) -> None:
        cert, key = pki.server
        config = {
            "tls_cert_file": str(cert),
            "tls_key_file": str(key),
            "tls_client_ca_file": str(pki.ca_path),
        }
        with in_process(tmp_path, **config) as srv:
            address = f"localhost:{srv.port}"
            with Client(
                address, timeout=5, root_certificates=pki.ca, client_certificate=pki.client
            ) as client:
                assert client.detect(red(), model="det").instances
            for name, kwargs in (
                ("no certificate", {"root_certificates": pki.ca}),
                ("rogue CA", {"root_certificates": pki.ca, "client_certificate": pki.rogue_client}),
                ("plaintext", {}),
            ):
                with Client(address, timeout=3, **kwargs) as refused, pytest.raises(ClientError) as info:
                    refused.list_models()
                assert info.value.code is grpc.StatusCode.UNAVAILABLE, name
            # Health too: TLS is checked before any RPC, whatever the auth settings.
            creds = grpc.ssl_channel_credentials(pki.ca)
            with grpc.secure_channel(address, creds) as channel, pytest.raises(grpc.RpcError) as rpc:
                health(channel)
            assert rpc.value.code() is grpc.StatusCode.UNAVAILABLE

    def test_client_ca_without_tls_is_a_config_error(self, pki: Pki) -> None:
        with pytest.raises(ValueError, match="tls_client_ca_file"):
            ServerConfig(tls_client_ca_file=str(pki.ca_path))


# ---- bearer tokens -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def token_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    with in_process(tmp_path_factory.mktemp("auth"), auth_token=TOKEN) as srv:
        yield srv


def _detect_request() -> pb.DetectRequest:
    raw = types_pb.RawImage(data=red(8, 8).tobytes(), height=8, width=8, channels=3)
    return pb.DetectRequest(model="det", image=types_pb.Image(raw=raw))


def _cvserve_calls(
    stub: pb_grpc.VisionServiceStub, metadata: tuple[tuple[str, str], ...]
) -> dict[str, object]:
    """Every cvserve.v1 RPC once, unary and streaming; the status code name of each."""
    calls = {
        "ListModels": lambda: stub.ListModels(pb.ListModelsRequest(), timeout=5, metadata=metadata),
        "GetModel": lambda: stub.GetModel(pb.GetModelRequest(name="det"), timeout=5, metadata=metadata),
        "Detect": lambda: stub.Detect(_detect_request(), timeout=5, metadata=metadata),
        "Segment": lambda: stub.Segment(
            pb.SegmentRequest(model="seg", image=_detect_request().image), timeout=5, metadata=metadata
        ),
        "PredictStream": lambda: list(
            stub.PredictStream(
                iter([pb.StreamRequest(detect=_detect_request())]), timeout=5, metadata=metadata
            )
        ),
    }
    codes: dict[str, object] = {}
    for name, call in calls.items():
        try:
            call()
            codes[name] = "OK"
        except grpc.RpcError as e:
            codes[name] = e.code().name
    return codes


class TestBearerToken:
    @pytest.mark.parametrize(
        "metadata",
        [(), (("authorization", "Bearer wrong-token-0000000000"),), (("authorization", TOKEN),),
         (("authorization", f"bearer {TOKEN}"),), (("authorization", f"Bearer {TOKEN} "),)],
        ids=["none", "wrong", "no-scheme", "lowercase-scheme", "trailing-space"],
    )  # fmt: skip
    def test_every_cvserve_rpc_needs_the_token(self, token_server: ServerThread, metadata: tuple) -> None:
        with grpc.insecure_channel(token_server.address) as channel:
            codes = _cvserve_calls(pb_grpc.VisionServiceStub(channel), metadata)
        assert set(codes.values()) == {"UNAUTHENTICATED"}, codes

    def test_the_right_token_opens_every_cvserve_rpc(self, token_server: ServerThread) -> None:
        with grpc.insecure_channel(token_server.address) as channel:
            codes = _cvserve_calls(
                pb_grpc.VisionServiceStub(channel), (("authorization", f"Bearer {TOKEN}"),)
            )
        assert set(codes.values()) == {"OK"}, codes

    def test_open_inference_protocol_needs_the_token(self, token_server: ServerThread) -> None:
        client = tc.InferenceServerClient(token_server.address)
        image = tc.InferInput("image", [8, 8, 3], "UINT8")
        image.set_data_from_numpy(red(8, 8))
        try:
            for call in (
                lambda **h: client.is_server_ready(**h),
                lambda **h: client.get_model_repository_index(**h),
                lambda **h: client.load_model("det", **h),
                lambda **h: client.infer("det", [image], **h),
            ):
                with pytest.raises(InferenceServerException) as info:
                    call()
                assert info.value.status() == "StatusCode.UNAUTHENTICATED"
                with pytest.raises(InferenceServerException) as info:
                    call(headers={"authorization": "Bearer nope"})
                assert info.value.status() == "StatusCode.UNAUTHENTICATED"
                call(headers={"authorization": f"Bearer {TOKEN}"})
        finally:
            client.close()

    @pytest.mark.parametrize("token", [None, TOKEN])
    def test_open_inference_protocol_stream_needs_the_token(
        self, token_server: ServerThread, token: str | None
    ) -> None:
        client = tc.InferenceServerClient(token_server.address)
        results: queue.Queue[tuple[object, object]] = queue.Queue()
        image = tc.InferInput("image", [8, 8, 3], "UINT8")
        image.set_data_from_numpy(red(8, 8))
        headers = {"authorization": f"Bearer {token}"} if token else None
        try:
            client.start_stream(lambda result, error: results.put((result, error)), headers=headers)
            try:
                client.async_stream_infer("det", [image])
            except InferenceServerException as e:  # refused so fast that the stream is already closed
                assert token is None and "no longer in valid state" in e.message()
            result, error = results.get(timeout=10)
        finally:
            client.stop_stream()
            client.close()
        if token:
            assert error is None and result.as_numpy("scores") is not None
        else:
            assert result is None and "UNAUTHENTICATED" in str(error)

    def test_health_is_open_by_default(self, token_server: ServerThread) -> None:
        with grpc.insecure_channel(token_server.address) as channel:
            assert health(channel) == SERVING

    def test_health_can_require_the_token(self, tmp_path: Path) -> None:
        with (
            in_process(tmp_path, auth_token=TOKEN, auth_health=True) as srv,
            grpc.insecure_channel(srv.address) as channel,
        ):
            with pytest.raises(grpc.RpcError) as rpc:
                health(channel)
            assert rpc.value.code() is grpc.StatusCode.UNAUTHENTICATED
            assert health(channel, (("authorization", f"Bearer {TOKEN}"),)) == SERVING


class TestTokenFile:
    def test_token_is_read_and_stripped(self, tmp_path: Path) -> None:
        path = tmp_path / "token"
        path.write_text(f"  {TOKEN}\n")
        path.chmod(0o600)
        assert read_token_file(path) == TOKEN

    def test_loose_permissions_warn_without_showing_the_token(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        path = tmp_path / "token"
        path.write_text(TOKEN)
        path.chmod(0o600)
        with caplog.at_level(logging.WARNING, logger="cvserve.server.auth"):
            read_token_file(path)
        assert not caplog.records
        path.chmod(0o644)
        with caplog.at_level(logging.WARNING, logger="cvserve.server.auth"):
            assert read_token_file(path) == TOKEN
        (record,) = caplog.records
        assert "mode 0644" in record.getMessage() and "chmod 600" in record.getMessage()
        assert TOKEN not in caplog.text

    @pytest.mark.parametrize(
        ("content", "message"),
        [("", "empty"), ("\n\n", "empty"), ("short", "fewer than 16"), ("two words here 0123456789", "no spaces"),
         ("tok\u00e9n-0123456789abcdef", "must be ASCII")],
    )  # fmt: skip
    def test_unusable_tokens_are_refused(self, tmp_path: Path, content: str, message: str) -> None:
        path = tmp_path / "token"
        path.write_text(content, encoding="utf-8")
        with pytest.raises(CredentialFileError, match=message):
            read_token_file(path)

    def test_missing_file(self, tmp_path: Path) -> None:
        with pytest.raises(CredentialFileError, match="no such file"):
            read_token_file(tmp_path / "nope")


# ---- what clients cannot reach -----------------------------------------------------------------


def _short_name(message: Descriptor) -> str:
    return message.full_name[len(message.file.package) + 1 :]


def _request_string_fields() -> set[str]:
    """``Message.field`` of every string field any RPC request can carry (a map: its name)."""
    found: set[str] = set()
    seen: set[str] = set()

    def walk(message: Descriptor) -> None:
        if message.full_name in seen:
            return
        seen.add(message.full_name)
        for field in message.fields:
            name = f"{_short_name(message)}.{field.name}"
            if field.type == FieldDescriptor.TYPE_STRING:
                found.add(name)
            elif field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.GetOptions().map_entry:
                key, value = (
                    field.message_type.fields_by_name["key"],
                    field.message_type.fields_by_name["value"],
                )
                if FieldDescriptor.TYPE_STRING in (key.type, value.type):
                    found.add(name)
                if value.type == FieldDescriptor.TYPE_MESSAGE:
                    walk(value.message_type)
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                walk(field.message_type)

    for module in (pb, kpb):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                walk(method.input_type)
    return found


class TestNoPathsFromClients:
    def test_security_md_audits_every_string_field_of_every_request(self) -> None:
        audit = (ROOT / "SECURITY.md").read_text()
        missing = sorted(f for f in _request_string_fields() if f"`{f}`" not in audit)
        assert not missing, f"string request fields not covered in SECURITY.md: {missing}"

    def test_path_like_model_names_are_unknown_models(self, token_server: ServerThread) -> None:
        with Client(token_server.address, timeout=5, token=TOKEN) as client:
            for name in ("/etc/passwd", "../models.yaml", "file:/etc/passwd", "det/../../etc"):
                with pytest.raises(ClientError) as info:
                    client.detect(red(), model=name)
                assert info.value.code is grpc.StatusCode.NOT_FOUND, name

    def test_repository_load_refuses_config_and_file_overrides(self, token_server: ServerThread) -> None:
        client = tc.InferenceServerClient(token_server.address)
        headers = {"authorization": f"Bearer {TOKEN}"}
        try:
            for kwargs in ({"config": '{"backend": "python"}'}, {"files": {"file:1/model.pt": b"\x80\x04"}}):
                with pytest.raises(InferenceServerException) as info:
                    client.load_model("det", headers=headers, **kwargs)
                assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
            assert client.is_model_ready("det", headers=headers)
        finally:
            client.close()


# ---- the serve command: flags, warnings and logs -----------------------------------------------


@needs_openssl
class TestServeCommand:
    def test_tls_client_ca_and_token_file_flags_with_clean_logs(self, tmp_path: Path) -> None:
        pki = make_pki(tmp_path)
        token_file = tmp_path / "token"
        token_file.write_text(TOKEN + "\n")
        token_file.chmod(0o644)  # loose on purpose: must warn
        marker = b"PIXELSECRET-"  # raw image bytes that would be readable in any log line
        image = np.frombuffer(marker * 64, np.uint8)[: 16 * 16 * 3].reshape(16, 16, 3)
        wrong_token = "WRONGTOKEN-" + "9" * 16
        repository = write_repository(tmp_path, [{"name": "det", "task": "instance"},
                                                 {"name": "flaky", "task": "instance", "options": {"fail_forward_on_red": True}}])  # fmt: skip
        cert, key = pki.server
        flags = ["--tls-cert", str(cert), "--tls-key", str(key), "--tls-client-ca", str(pki.ca_path),
                 "--auth-token-file", str(token_file), "--log-format", "json"]  # fmt: skip
        with serve_cli(tmp_path, repository, *flags, log_level="DEBUG") as server:
            address = server.address.replace("127.0.0.1", "localhost")  # the name the certificate holds
            tls = {"root_certificates": pki.ca, "client_certificate": pki.client}
            wait_ready(address, "det", token=TOKEN, **tls)
            with Client(address, timeout=10, token=TOKEN, **tls) as client:
                assert client.detect(image, model="det").image_size == (16, 16)
                failing = image.copy()
                failing[0, 0] = (255, 0, 0)  # the flaky fake fails the batch: a logged traceback
                for model, data, code in (
                    ("det", marker * 40, grpc.StatusCode.INVALID_ARGUMENT),
                    ("flaky", failing, grpc.StatusCode.INTERNAL),
                ):
                    with pytest.raises(ClientError) as info:
                        client.detect(data, model=model)
                    assert info.value.code is code
            for token in (wrong_token, None):
                with (
                    Client(address, timeout=10, token=token, **tls) as client,
                    pytest.raises(ClientError) as info,
                ):
                    client.detect(image, model="det")
                assert info.value.code is grpc.StatusCode.UNAUTHENTICATED
            server.proc.terminate()
            assert server.proc.wait(30) == 0
        logs = server.log()
        records = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
        codes = {r.get("code") for r in records}
        assert {"OK", "INVALID_ARGUMENT", "INTERNAL", "UNAUTHENTICATED"} <= codes  # the run was logged
        assert any("fake batch failure" in r.get("exc_info", "") for r in records)  # tracebacks too
        assert any("mode 0644" in r["message"] and "chmod 600" in r["message"] for r in records)
        for secret in (TOKEN, wrong_token, marker.decode(), marker.hex()):
            assert secret not in logs, f"{secret!r} was logged"

    def test_serve_flag_errors_name_the_flag(self, tmp_path: Path) -> None:
        repository = write_repository(tmp_path, MODELS)
        short = tmp_path / "short"
        short.write_text("abc")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        for flags, message in (
            (["--auth-token-file", str(tmp_path / "missing")], "--auth-token-file: token file"),
            (["--auth-token-file", str(short)], "fewer than 16"),
            (
                ["--tls-cert", str(tmp_path / "c.pem"), "--tls-key", str(tmp_path / "k.pem")],
                "--tls-cert: file",
            ),
            (["--auth-health"], "--auth-health: needs --auth-token-file"),
        ):
            cmd = [sys.executable, "-m", "cvserve", "serve", "--models", str(repository), "--port", "0",
                   "--no-metrics", *flags]  # fmt: skip
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
            assert done.returncode == 2 and message in done.stderr, (flags, done.stderr)
