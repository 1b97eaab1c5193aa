"""The committed ``service/_proto`` package is exactly what ``scripts/gen_protos.py`` makes of ``protos/``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "service" / "_proto"


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_generated_code_matches_the_protos(tmp_path: Path) -> None:
    out = tmp_path / "_proto"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    fresh, committed = _tree(out), _tree(COMMITTED)
    assert sorted(fresh) == sorted(committed), "run `python scripts/gen_protos.py` and commit service/_proto"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale generated files {stale}: run `python scripts/gen_protos.py` and commit them"


def test_every_proto_is_compiled_and_importable() -> None:
    import importlib

    protos = sorted((ROOT / "protos").rglob("*.proto"))
    assert protos
    for proto in protos:
        module = ".".join(proto.relative_to(ROOT / "protos").with_suffix("").parts)
        for suffix in ("_pb2", "_pb2_grpc"):
            assert importlib.import_module(f"cvserve._proto.{module}{suffix}")
