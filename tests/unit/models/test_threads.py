"""Sharing intra-op threads among forward passes running at once."""

from __future__ import annotations

import threading

import pytest
import torch

from cvserve.models import threads
from cvserve.models.threads import IntraOpShare, cpu_instances, per_thread_intra_op

needs_openmp = pytest.mark.skipif(
    not per_thread_intra_op(), reason="torch's intra-op count is process-wide here"
)


@pytest.fixture(autouse=True)
def _restore_thread_count():
    # torch.set_num_threads in any thread also sets the count new threads start with.
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _in_thread(fn):
    out = {}

    def run() -> None:
        out["value"] = fn()

    t = threading.Thread(target=run)
    t.start()
    t.join(10)
    return out["value"]


@needs_openmp
def test_a_lone_pass_gets_every_thread_and_two_passes_split_them() -> None:
    share = IntraOpShare(threads=4)
    inside = threading.Event()
    leave = threading.Event()
    seen: dict[str, int] = {}

    def first() -> None:
        with share as n:
            seen["first"] = n
            seen["first_torch"] = torch.get_num_threads()
            inside.set()
            leave.wait(10)

    t = threading.Thread(target=first)
    t.start()
    assert inside.wait(10)

    def second() -> tuple[int, int, int]:
        with share as n:
            return n, torch.get_num_threads(), share.running

    assert _in_thread(second) == (2, 2, 2)
    leave.set()
    t.join(10)
    assert (seen["first"], seen["first_torch"]) == (4, 4)
    assert share.running == 0
    assert _in_thread(lambda: share.__enter__()) == 4  # alone again: all of them


@needs_openmp
def test_the_share_never_drops_below_one_thread() -> None:
    share = IntraOpShare(threads=2)
    for _ in range(3):
        share.__enter__()
    assert _in_thread(lambda: share.__enter__()) == 1
    for _ in range(4):
        share.__exit__(None, None, None)
    assert share.running == 0


def test_the_share_leaves_the_count_on_exception() -> None:
    share = IntraOpShare(threads=2)
    with pytest.raises(RuntimeError), share:
        raise RuntimeError("forward failed")
    assert share.running == 0


def test_invalid_thread_count() -> None:
    with pytest.raises(ValueError, match="threads must be >= 1"):
        IntraOpShare(threads=0)


def test_cpu_instances_is_one_per_core_up_to_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads, "per_thread_intra_op", lambda: True)
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda _pid: set(range(2)), raising=False)
    assert cpu_instances() == 2
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda _pid: set(range(64)), raising=False)
    assert cpu_instances() == threads.MAX_AUTO_CPU_INSTANCES
    monkeypatch.setattr(threads, "per_thread_intra_op", lambda: False)
    assert cpu_instances() == 1  # a process-wide thread count cannot be shared out


def test_forward_threads_only_share_on_the_cpu() -> None:
    assert threads.forward_threads("cpu") is threads.cpu_share()
    assert not isinstance(threads.forward_threads("cuda:0"), IntraOpShare)


@needs_openmp
def test_a_helper_thread_runs_on_one_thread_and_passes_still_get_their_share() -> None:
    assert _in_thread(lambda: (threads.limit_helper_thread(), torch.get_num_threads())[1]) == 1
    # A pass in a thread that never set a count starts from the helper's 1 and takes its share.
    share = IntraOpShare(threads=2)

    def a_pass() -> int:
        with share:
            return torch.get_num_threads()

    assert _in_thread(a_pass) == 2
    assert IntraOpShare().threads == threads.PROCESS_THREADS
