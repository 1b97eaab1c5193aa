"""The annotation journal: torn writes, fingerprints, locking and atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cvserve.annotation.journal import Journal, JournalError, atomic_write_json

FP = {"model": "m", "inputs": ["/data"]}


def _image(n: int) -> dict:
    return {"type": "image", "path": f"/data/{n}.png", "instances": []}


def test_records_survive_reopen(tmp_path: Path) -> None:
    path = str(tmp_path / "j.jsonl")
    with Journal(path, FP) as journal:
        assert journal.records == []
        journal.append([_image(1), _image(2)])
        journal.append([{"type": "error", "path": "/data/3.png", "reason": "bad"}])
    with Journal(path, FP) as journal:
        assert [r["path"] for r in journal.records] == ["/data/1.png", "/data/2.png", "/data/3.png"]


@pytest.mark.parametrize("torn", [b'{"type": "image", "pa', b'{"type": "ima\n', b"\x00\x00\x00"])
def test_torn_last_line_is_ignored_and_cut_off(tmp_path: Path, torn: bytes) -> None:
    path = tmp_path / "j.jsonl"
    with Journal(str(path), FP) as journal:
        journal.append([_image(1)])
    with path.open("ab") as f:
        f.write(torn)
    with Journal(str(path), FP) as journal:
        assert [r["path"] for r in journal.records] == ["/data/1.png"]
        journal.append([_image(2)])
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b""  # every line complete again
    assert [json.loads(line)["type"] for line in lines[:-1]] == ["header", "image", "image"]


def test_corrupt_line_in_the_middle_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    with Journal(str(path), FP) as journal:
        journal.append([_image(1)])
    text = path.read_text()
    path.write_text(text + "garbage\n" + json.dumps(_image(2)) + "\n")
    with pytest.raises(JournalError, match=r"line 3 is corrupt.*--restart"):
        Journal(str(path), FP)


def test_other_fingerprint_is_refused_unless_restart(tmp_path: Path) -> None:
    path = str(tmp_path / "j.jsonl")
    with Journal(path, FP) as journal:
        journal.append([_image(1)])
    other = {**FP, "model": "n"}
    with pytest.raises(JournalError, match=r"different arguments \(model: 'm' -> 'n'\).*--restart"):
        Journal(path, other)
    with Journal(path, other, restart=True) as journal:
        assert journal.records == []
    with Journal(path, other) as journal:  # the restarted journal now belongs to the new job
        assert journal.records == []


def test_torn_header_starts_a_new_journal(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    path.write_bytes(b'{"type": "head')
    with Journal(str(path), FP) as journal:
        assert journal.records == []
    assert json.loads(path.read_text().splitlines()[0])["fingerprint"] == FP


def test_second_writer_is_refused_while_the_first_holds_the_lock(tmp_path: Path) -> None:
    path = str(tmp_path / "j.jsonl")
    with Journal(path, FP), pytest.raises(JournalError, match="another annotate run"):
        Journal(path, FP)
    with Journal(path, FP):  # released on close
        pass


def test_atomic_write_replaces_whole_file_and_leaves_no_temporaries(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "out.json"
    atomic_write_json(str(target), [1, 2])
    atomic_write_json(str(target), {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in target.parent.iterdir()] == ["out.json"]
