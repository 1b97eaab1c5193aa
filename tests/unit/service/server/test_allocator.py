"""glibc malloc thresholds for the serving process."""

from __future__ import annotations

import platform

import pytest

from cvserve.server import allocator


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_thresholds_are_applied_on_glibc() -> None:
    assert allocator.keep_freed_memory() is True


def test_nothing_changes_off_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("", ""))
    assert allocator.keep_freed_memory() is False


def test_negative_thresholds_are_refused() -> None:
    with pytest.raises(ValueError, match="thresholds must be >= 0"):
        allocator.keep_freed_memory(mmap_threshold=-1)
