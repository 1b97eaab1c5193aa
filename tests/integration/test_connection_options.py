"""Every command that calls a server reaches one that requires a token and mutual TLS,
with the same options (``cvserve client``, ``health``, ``annotate --server``, ``eval --server``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cvserve.cli.main import build_parser, main
from cvserve.server.build import ServerThread
from tests.integration.test_security import TOKEN, Pki, in_process, make_pki, needs_openssl

pytestmark = [needs_openssl, pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]
COMMANDS = (["client", "models"], ["client", "detect", "x.png"], ["health"], ["annotate", "x", "--model", "m",
            "--out", "o.json"], ["eval", "--model", "m", "--images", "x"])  # fmt: skip
SHARED = ("--server", "--timeout", "--token", "--token-env", "--token-file", "--tls", "--tls-ca", "--tls-cert",
          "--tls-key")  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def secured(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerThread, list[str]]]:
    """A server requiring mutual TLS and the token (on health checks too); the client options for it."""
    root = tmp_path_factory.mktemp("secured")
    cert, key = pki.server
    client_cert, client_key = root / "client.pem", root / "client.key"
    client_cert.write_bytes(pki.client[0])
    client_key.write_bytes(pki.client[1])
    config = {"tls_cert_file": str(cert), "tls_key_file": str(key), "tls_client_ca_file": str(pki.ca_path),
              "auth_token": TOKEN, "auth_health": True}  # fmt: skip
    with in_process(root, **config) as srv:
        tls = ["--tls-ca", str(pki.ca_path), "--tls-cert", str(client_cert), "--tls-key", str(client_key)]
        yield srv, ["--server", f"localhost:{srv.port}", *tls]


@pytest.fixture
def token_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CVSERVE_TOKEN", TOKEN)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images")
    (root / "images").mkdir()
    (root / "labels").mkdir()
    rgb = np.zeros((24, 32, 3), np.uint8)
    rgb[:, :16, 0] = 220  # red left half: the fake segmenter's label 1, the fake detector's "red"
    Image.fromarray(rgb).save(root / "images" / "a.png")
    labels = np.zeros((24, 32), np.uint8)
    labels[:, :16] = 1
    Image.fromarray(labels).save(root / "labels" / "a.png")
    return root


def test_every_calling_command_has_the_same_connection_options() -> None:
    parser = build_parser()
    for argv in COMMANDS:
        args = parser.parse_args([*argv, "--timeout=1", "--tls"])
        assert args.tls is True and args.timeout == 1.0
        for option in SHARED:
            actions = [a for a in _subparser(parser, argv)._actions if option in a.option_strings]
            assert len(actions) == 1, (argv, option)


def _subparser(parser, argv):  # type: ignore[no-untyped-def]
    for action in parser._subparsers._group_actions:
        sub = action.choices[argv[0]]
        if argv[0] == "client":
            return sub._subparsers._group_actions[0].choices[argv[1]]
        return sub
    raise AssertionError("no subcommands")


def test_client_with_token_from_the_environment_and_mutual_tls(
    secured: tuple[ServerThread, list[str]], token_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    _, connect = secured
    assert main(["client", "models", *connect]) == 0
    names = {m["name"] for m in json.loads(capsys.readouterr().out)}
    assert names == {"det", "seg"}


def test_client_detect_with_token_flag(
    secured: tuple[ServerThread, list[str]], images: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, connect = secured
    assert main(["client", "detect", str(images / "images" / "a.png"), "--model", "det", *connect,
                 "--token", TOKEN]) == 0  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    assert [d["class_name"] for d in out["detections"]] == ["red"]


def test_client_without_token_or_certificate_is_refused(
    secured: tuple[ServerThread, list[str]],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, connect = secured
    monkeypatch.delenv("CVSERVE_TOKEN", raising=False)
    assert main(["client", "models", *connect]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    no_cert = connect[: connect.index("--tls-cert")]
    assert main(["client", "models", *no_cert, "--token", TOKEN, "--timeout", "3"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_health_with_token_file(
    secured: tuple[ServerThread, list[str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, connect = secured
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    assert main(["health", *connect, "--token-file", str(token_file)]) == 0
    assert "SERVING" in capsys.readouterr().out
    assert main(["health", *connect, "--token", "wrong-token-0123456789"]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().out


def test_annotate_through_the_secured_server(
    secured: tuple[ServerThread, list[str]], images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, connect = secured
    monkeypatch.setenv("MY_TOKEN", TOKEN)
    out = tmp_path / "results.json"
    argv = ["annotate", str(images / "images"), "--model", "det", *connect, "--token-env", "MY_TOKEN",
            "--out", str(out), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    assert [r["category_id"] for r in json.loads(out.read_text())] == [1]


def test_eval_through_the_secured_server(
    secured: tuple[ServerThread, list[str]], images: Path, tmp_path: Path, token_env: None
) -> None:
    _, connect = secured
    out = tmp_path / "report"
    argv = ["eval", "--model", "seg", *connect, "--images", str(images / "images"), "--labels",
            str(images / "labels"), "--out", str(out), "--no-plots"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["num_images"] == 1 and report["metrics"]["pACC"] > 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--tls-cert", "c.pem"], "--tls-cert and --tls-key go together"),
        (["--tls-ca", "missing.pem"], "--tls-ca missing.pem: cannot read"),
        (
            ["--token-env", "CVSERVE_TEST_UNSET"],
            "--token-env CVSERVE_TEST_UNSET: no such environment variable",
        ),
        (["--token", "two words"], "--token: the token must be visible ASCII without spaces"),
        (["--token", ""], "--token: the token is empty"),
        (["--timeout", "0"], "--timeout must be > 0"),
    ],
)
def test_bad_connection_options_are_cli_errors(
    extra: list[str], message: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CVSERVE_TEST_UNSET", raising=False)
    for argv in (["client", "models"], ["health"]):
        assert main([*argv, "--server", "127.0.0.1:1", *extra]) == 2
        assert message in capsys.readouterr().err


def test_token_options_exclude_each_other(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["health", "--token", TOKEN, "--token-env", "X"])
    assert "not allowed with argument" in capsys.readouterr().err
