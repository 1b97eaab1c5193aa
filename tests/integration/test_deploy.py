"""The deploy/ manifests against the server they deploy.

Kubernetes objects are validated against Kubernetes' own schemas (``kubernetes-validate``,
strict: no unknown fields) for the oldest version with GA gRPC probes and the newest known.
Then every fact the manifests rely on is checked on the real thing: the container's
arguments are accepted by ``cvserve serve`` and make a valid server configuration, the
ports are the ones those arguments bind, the health service names the probes ask for are
SERVING on a running server (liveness while models still load), the autoscaler's metric is
a gauge the server exports, and the KServe objects refer to each other consistently.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import time
from collections.abc import Iterator
from typing import Any

import grpc
import kubernetes_validate
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cvserve.cli import serve
from cvserve.cli.main import build_parser
from cvserve.kserve.servicer import add_kserve_servicer
from cvserve.metrics import Metrics
from cvserve.models.repository import load_repository
from cvserve.server.build import ServerThread
from tests.integration.test_server_ops import ROOT, write_repository

DEPLOY = ROOT / "deploy"
K8S_VERSIONS = ("1.27", kubernetes_validate.latest_version())
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def documents(*parts: str) -> dict[str, dict[str, Any]]:
    """``kind -> object`` of every manifest under ``deploy/<parts>``."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(DEPLOY.joinpath(*parts).glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and "kind" in doc and doc["kind"] != "Kustomization":
                assert doc["kind"] not in out, f"two {doc['kind']} objects"
                out[doc["kind"]] = doc
    return out


K8S = documents("kubernetes")
KSERVE = documents("kserve")


def container(kind: str) -> dict[str, Any]:
    if kind == "Deployment":
        return K8S["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    return KSERVE["ServingRuntime"]["spec"]["containers"][0]


def serve_args(kind: str) -> argparse.Namespace:
    """The container's arguments as ``cvserve serve`` parses them (a bad flag fails here)."""
    c = container(kind)
    assert c["command"][-1].endswith("/.venv/bin/cvserve")
    args = build_parser().parse_args(c["args"])
    assert args.command == "serve"
    return args


def ports(kind: str) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container(kind)["ports"]}


def test_kustomization_lists_every_manifest() -> None:
    listed = yaml.safe_load((DEPLOY / "kubernetes" / "kustomization.yaml").read_text())["resources"]
    files = {p.name for p in (DEPLOY / "kubernetes").glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(listed) == sorted(files)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("kind", ["Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap"])
def test_kubernetes_objects_match_the_kubernetes_schema(kind: str, version: str) -> None:
    kubernetes_validate.validate(K8S[kind], version, strict=True)


def test_the_command_is_the_images_entry_point() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    workdir = re.search(r"^WORKDIR (\S+)", dockerfile, re.M)
    assert workdir is not None
    for kind in ("Deployment", "ServingRuntime"):
        assert container(kind)["command"] == [f"{workdir.group(1)}/.venv/bin/cvserve"]
    uid = re.search(r"useradd .*--uid (\d+)", dockerfile)
    assert uid is not None
    assert K8S["Deployment"]["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == int(uid.group(1))


@pytest.mark.parametrize("kind", ["Deployment", "ServingRuntime"])
def test_arguments_make_a_valid_server_config(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    args = serve_args(kind)
    for env in container(kind).get("env", []):
        monkeypatch.setenv(env["name"], "t" * 32)  # the secret's value, as Kubernetes injects it
    if args.auth_token_env:
        names = {e["name"] for e in container(kind)["env"]}
        assert args.auth_token_env in names, "--auth-token-env names a variable the pod does not set"
        assert not args.auth_health, "native gRPC probes send no token"
    assert not (args.tls_cert or args.tls_client_ca), "native gRPC probes do not speak TLS"
    config = serve._config(args)
    assert config.host == "0.0.0.0" and config.metrics_port is not None


def test_deployment_ports_service_and_gpu() -> None:
    args = serve_args("Deployment")
    assert ports("Deployment") == {"grpc": args.port, "metrics": args.metrics_port}
    service = K8S["Service"]["spec"]
    pod_labels = K8S["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert service["selector"].items() <= pod_labels.items()
    assert K8S["Deployment"]["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert {p["targetPort"] for p in service["ports"]} == set(ports("Deployment"))
    assert container("Deployment")["resources"]["limits"]["nvidia.com/gpu"] >= 1
    mount = container("Deployment")["volumeMounts"][0]["mountPath"]
    assert args.models.startswith(mount + "/")
    spec = K8S["Deployment"]["spec"]["template"]["spec"]
    pre_stop = int(container("Deployment")["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert spec["terminationGracePeriodSeconds"] > pre_stop + args.grace_period


def probes(kind: str) -> dict[str, dict[str, Any]]:
    c = container(kind)
    return {
        name: c[name]["grpc"] for name in ("startupProbe", "livenessProbe", "readinessProbe") if name in c
    }


@pytest.fixture(scope="module")
def loading_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    """A server built from the Deployment's arguments (on free ports), its one model still loading."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    args = serve_args("Deployment")
    args.auth_token_env = None  # the token is checked above; health is open either way
    config = dataclasses.replace(serve._config(args), port=0, metrics_port=0, warmup=False)
    models = [{"name": "det", "task": "instance", "options": {"load_delay_ms": 5000}}]
    specs = load_repository(write_repository(tmp_path_factory.mktemp("repo"), models))
    with ServerThread(config, specs, servicers=[add_kserve_servicer]).start() as srv:
        yield srv


def _health(address: str, service: str) -> int:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def test_probes_ask_the_server_for_names_it_registers(loading_server: ServerThread) -> None:
    assert loading_server.dataplane.models()[0].state == "loading"  # for 5 s
    for kind in ("Deployment", "ServingRuntime"):
        args = serve_args(kind)
        found = probes(kind)
        assert {"livenessProbe", "readinessProbe"} <= set(found)
        for probe in found.values():
            assert probe["port"] == args.port
        liveness = {found[n]["service"] for n in found if n != "readinessProbe"}
        assert len(liveness) == 1
        # While the model loads: alive, not ready (a liveness probe must not restart a loading server).
        assert _health(loading_server.address, liveness.pop()) == SERVING
        assert _health(loading_server.address, found["readinessProbe"]["service"]) == NOT_SERVING


def test_readiness_turns_serving_once_the_model_is_loaded(loading_server: ServerThread) -> None:
    loading_server.run(loading_server.dataplane.wait_loaded(30), 30)
    for kind in ("Deployment", "ServingRuntime"):
        for probe in probes(kind).values():
            deadline = time.monotonic() + 10
            while _health(loading_server.address, probe["service"]) != SERVING:
                assert time.monotonic() < deadline, probe
                time.sleep(0.1)


def exported_metrics() -> dict[str, str]:
    """Metric family name -> type of everything the server exports."""
    return {family.name: family.type for family in Metrics().registry.collect()}


def test_autoscaler_scales_the_deployment_on_an_exported_gauge() -> None:
    hpa = K8S["HorizontalPodAutoscaler"]["spec"]
    target = hpa["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", K8S["Deployment"]["metadata"]["name"])
    [metric] = hpa["metrics"]
    name = metric["pods"]["metric"]["name"]
    assert exported_metrics().get(name) == "gauge"  # a queue depth is a level, not a rate
    rules = yaml.safe_load(K8S["ConfigMap"]["data"]["config.yaml"])["rules"]
    [rule] = [r for r in rules if r["name"]["as"] == name]
    series = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{", rule["seriesQuery"])
    assert series is not None and series.group(1) in exported_metrics()
    assert re.fullmatch(rule["name"]["matches"], series.group(1))


def test_pod_monitor_scrapes_the_metrics_port() -> None:
    monitor = K8S["PodMonitor"]["spec"]
    pod_labels = K8S["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert monitor["selector"]["matchLabels"].items() <= pod_labels.items()
    [endpoint] = monitor["podMetricsEndpoints"]
    assert endpoint["port"] in ports("Deployment") and endpoint["port"] == "metrics"


def test_kserve_runtime_and_inference_service_agree() -> None:
    args = serve_args("ServingRuntime")
    runtime = KSERVE["ServingRuntime"]
    service = KSERVE["InferenceService"]["spec"]["predictor"]["model"]
    assert ports("ServingRuntime") == {"h2c": args.port}  # KServe sends gRPC to the port named h2c
    assert runtime["spec"]["annotations"]["prometheus.kserve.io/port"] == str(args.metrics_port)
    assert service["runtime"] == runtime["metadata"]["name"]
    assert service["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert service["protocolVersion"] == "grpc-v2" and "grpc-v2" in runtime["spec"]["protocolVersions"]
    assert args.models.startswith("/mnt/models/")  # where KServe's storage initializer puts storageUri
    assert service["resources"]["limits"]["nvidia.com/gpu"] >= 1


def test_open_inference_protocol_is_on_the_probed_port(loading_server: ServerThread) -> None:
    """The grpc-v2 port serves inference.GRPCInferenceService (ServerLive through tritonclient)."""
    tc = pytest.importorskip("tritonclient.grpc")
    client = tc.InferenceServerClient(loading_server.address)
    try:
        assert client.is_server_live()
    finally:
        client.close()


def test_docs_name_every_manifest() -> None:
    text = (ROOT / "docs" / "deploy.md").read_text()
    for path in sorted(DEPLOY.rglob("*.yaml")):
        assert str(path.relative_to(ROOT)) in text, path
