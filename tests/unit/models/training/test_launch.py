"""Reading the environment ``torchrun`` (env:// rendezvous) gives each process."""

from __future__ import annotations

import pytest

from cvserve.models.training.launch import LauncherEnvironment, launcher_environment

FULL = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "29500"}


def test_a_launched_process_knows_its_place() -> None:
    launch = launcher_environment(FULL)
    assert launch == LauncherEnvironment(
        rank=3, world_size=4, local_rank=1, master_addr="10.0.0.7", master_port=29500
    )
    assert launch.device("cuda") == "cuda:1"  # the GPU of its rank on this machine, not the global rank
    assert launch.device("cpu") == "cpu"


def test_no_launcher_and_a_world_of_one_are_plain_runs() -> None:
    assert launcher_environment({}) is None
    assert launcher_environment({**FULL, "WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}) is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"MASTER_ADDR": None}, "MASTER_ADDR is not"),
        ({"RANK": None, "MASTER_PORT": None}, "RANK, MASTER_PORT are not"),
        ({"RANK": "4"}, "RANK=4: must be >= 0 and <= 3"),
        ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two': not an integer"),
        ({"MASTER_PORT": "70000"}, "MASTER_PORT=70000: must be >= 1 and <= 65535"),
    ],
)
def test_an_incomplete_or_malformed_launch_names_the_variable(change: dict, message: str) -> None:
    env = {k: v for k, v in {**FULL, **change}.items() if v is not None}
    with pytest.raises(ValueError, match=message):
        launcher_environment(env)


def test_options_a_launched_run_cannot_take() -> None:
    launch = launcher_environment(FULL)
    assert launch is not None
    launch.check(processes=1, batch_size=8)
    with pytest.raises(ValueError, match="leave processes at 1"):
        launch.check(processes=2, batch_size=8)
    with pytest.raises(ValueError, match=r"batch_size \(6\) must be a multiple of the launched world size"):
        launch.check(processes=1, batch_size=6)
