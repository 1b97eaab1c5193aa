"""Sharing intra-op threads among forward passes running at once."""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
import time

import pytest
import torch

from cvserve.models import threads
from cvserve.models.instance import nhwc_roi_align, proposals
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
    now = [100.0]
    share = IntraOpShare(threads=4, window=1.0, clock=lambda: now[0])
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
    now[0] += 0.5  # alone, but two ran at once within the window: load, so still the share
    assert _in_thread(lambda: (share.__enter__(), share.__exit__(None, None, None))[0]) == 2
    now[0] += 1.01  # a whole window without overlap: a lone pass gets every thread again
    assert _in_thread(lambda: share.__enter__()) == 4


def test_the_window_counts_the_most_passes_at_once() -> None:
    now = [0.0]
    share = IntraOpShare(threads=8, window=2.0, clock=lambda: now[0])
    for _ in range(4):
        share.__enter__()
    for _ in range(4):
        share.__exit__(None, None, None)
    now[0] = 1.0
    assert share.__enter__() == 2  # 4 at once a second ago
    share.__exit__(None, None, None)
    now[0] = 2.5  # the moment of 4 has left the window (the last exit, 1.0, recorded only 1)
    assert share.__enter__() == 8
    share.__exit__(None, None, None)
    with pytest.raises(ValueError, match="window must be >= 0"):
        IntraOpShare(threads=2, window=-1)


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


needs_libgomp = pytest.mark.skipif(
    threads._libgomp_pause() is None, reason="torch does not run on libgomp here"
)


def _workers_named(name: str) -> int:
    """Threads of this process whose kernel name is ``name`` (libgomp's workers take their creator's)."""
    count = 0
    for task in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError), open(f"/proc/self/task/{task}/comm", encoding="utf-8") as f:
            count += f.read().strip() == name
    return count


def _parallel_work() -> None:
    torch.ones(1 << 22).mul_(2).sum()  # far above at::parallel_for's grain: runs on the team


def _teams_in_named_thread(name: str, body) -> list[int]:
    """Run ``body(sample)`` in a thread called ``name``; ``sample()`` counts that name's threads."""
    samples: list[int] = []

    def sample(settle_to: int | None = None) -> None:
        deadline = time.monotonic() + 5
        count = _workers_named(name)
        while settle_to is not None and count > settle_to and time.monotonic() < deadline:
            time.sleep(0.01)  # a released worker exits asynchronously
            count = _workers_named(name)
        samples.append(count)

    def run() -> None:
        threading.current_thread().name = name
        ctypes.CDLL(None).prctl(15, name.encode(), 0, 0, 0)  # PR_SET_NAME: the kernel's name for it
        body(sample)

    t = threading.Thread(target=run)
    t.start()
    t.join(30)
    return samples


@needs_libgomp
def test_release_team_gives_back_the_calling_threads_openmp_workers() -> None:
    def body(sample) -> None:
        sample()  # the thread alone
        torch.set_num_threads(2)
        _parallel_work()
        sample()  # with its team's worker
        assert threads.release_team()
        sample(settle_to=1)

    alone, with_team, released = _teams_in_named_thread("cvs-omp-probe", body)
    assert (alone, with_team) == (1, 2)
    assert released == 1


@needs_libgomp
def test_a_pass_on_more_than_one_thread_releases_its_team_on_leaving() -> None:
    share = IntraOpShare(threads=2)

    def body(sample) -> None:
        sample()
        with share:
            _parallel_work()
            sample()
        sample(settle_to=1)

    assert _teams_in_named_thread("cvs-omp-pass", body) == [1, 2, 1]


@needs_libgomp
def test_a_limited_helper_thread_holds_no_team() -> None:
    def body(sample) -> None:
        torch.set_num_threads(2)
        _parallel_work()
        sample()
        threads.limit_helper_thread()
        _parallel_work()
        sample(settle_to=1)

    assert _teams_in_named_thread("cvs-omp-help", body) == [2, 1]


@needs_libgomp
def test_a_helper_keeps_one_thread_when_a_pass_sets_more_before_its_first_parallel_work() -> None:
    """torch sets a thread's OpenMP count lazily, at its first parallel work, to the count
    last set by *any* thread. A helper limited before that point must stay limited, or a
    model pass setting 2 in between gives the helper a team that idles beside the passes
    (seen in the server: a held team made lone requests 10-35 ms slower)."""
    limited, passed = threading.Event(), threading.Event()

    def body(sample) -> None:
        threads.limit_helper_thread()  # the thread's first torch call, as in a fresh pool thread
        limited.set()
        passed.wait(10)
        _parallel_work()
        sample(settle_to=1)
        samples.append(torch.get_num_threads())

    samples: list[int] = []
    helper = threading.Thread(target=lambda: samples.extend(_teams_in_named_thread("cvs-omp-late", body)))
    helper.start()
    limited.wait(10)
    torch.set_num_threads(2)  # a pass on another thread
    passed.set()
    helper.join(30)
    assert sorted(samples) == [1, 1]  # no worker beside the helper, and still one thread


def test_release_team_is_false_without_libgomp(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads, "_libgomp_pause", lambda: None)
    assert not threads.release_team()


@needs_libgomp
@pytest.mark.skipif(
    nhwc_roi_align._kernel is None or proposals._nms is None, reason="the C extensions were not built"
)
@pytest.mark.parametrize("kernel", ["roi_align", "nms"])
def test_the_c_kernels_run_on_the_calling_threads_team(kernel: str) -> None:
    """No thread pool of their own: their work goes to the calling thread's libgomp team (made by
    the call, as torch's parallel work makes it), and on one thread no team is made. Only the
    kernel runs in the probing thread: its inputs are made beforehand."""
    g = torch.Generator().manual_seed(0)
    if kernel == "roi_align":
        threads.shares_team(nhwc_roi_align._kernel)
        fmap = torch.randn(1, 8, 32, 32).contiguous(memory_format=torch.channels_last)
        rois = torch.tensor([[0.0, 1.0, 1.0, 20.0, 20.0]] * 32)
        out = torch.empty(32, 8, 7, 7)
        maps = [(fmap.data_ptr(), 32, 32, 1.0)]
        args = (maps, False, 1, 8, rois.data_ptr(), 32, 0, 7, 7, 0, True, out.data_ptr(), False)
        call = nhwc_roi_align._kernel.pool
    else:
        threads.shares_team(proposals._nms)
        corners = torch.rand(6000, 2, generator=g) * 300
        boxes = torch.cat([corners, corners + 20], dim=1)
        members = torch.randperm(6000, generator=g)
        starts = torch.tensor([0, 2000, 4000, 6000])
        keep = torch.zeros(6000, dtype=torch.bool)
        args = (boxes.data_ptr(), members.data_ptr(), starts.data_ptr(), 3, 100, 0.7, keep.data_ptr())
        call = proposals._nms.groups

    def body(sample) -> None:
        call(*args, 1)
        sample()  # on one thread: no team
        call(*args, 2)
        sample()  # shared: the team's worker
        assert threads.release_team()

    assert _teams_in_named_thread(f"cvs-omp-{kernel[:5]}", body) == [1, 2]
    assert "shared over each pass's OpenMP threads" in nhwc_roi_align.describe()
