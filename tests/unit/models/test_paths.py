"""Where the demo repository is by default: environment, checkout, or the user's data folder."""

from __future__ import annotations

from pathlib import Path

from cvserve.models import paths


def _checkout(tmp_path: Path) -> Path:
    root = tmp_path / "checkout"
    (root / "service").mkdir(parents=True)
    (root / "service" / "__init__.py").write_text("")
    (root / "pyproject.toml").write_text("[project]\nname = 'cvserve'\n")
    (root / "models").mkdir()
    return root / "models" / "paths.py"


def _wheel(tmp_path: Path) -> Path:
    return tmp_path / "site-packages" / "cvserve" / "models" / "paths.py"


def test_a_source_checkout_keeps_its_demo_repository_beside_the_code(tmp_path: Path) -> None:
    here = _checkout(tmp_path)
    found = paths.default_repository_path({"HOME": "/home/u"}, here)
    assert found == tmp_path / "checkout" / "demo_repository" / "models.yaml"


def test_a_wheel_uses_the_users_data_folder(tmp_path: Path) -> None:
    here = _wheel(tmp_path)
    assert paths.default_repository_path({"HOME": "/home/u"}, here) == Path(
        "/home/u/.local/share/cvserve/demo_repository/models.yaml"
    )
    xdg = {"HOME": "/home/u", "XDG_DATA_HOME": "/data"}
    assert paths.default_repository_path(xdg, here) == Path("/data/cvserve/demo_repository/models.yaml")


def test_cvserve_home_wins_over_the_checkout_and_the_data_folder(tmp_path: Path) -> None:
    env = {"HOME": "/home/u", "XDG_DATA_HOME": "/data", "CVSERVE_HOME": "/var/lib/cvserve"}
    for here in (_checkout(tmp_path), _wheel(tmp_path)):
        assert paths.default_repository_path(env, here) == Path(
            "/var/lib/cvserve/demo_repository/models.yaml"
        )
        assert paths.cvserve_home(env, here) == Path("/var/lib/cvserve")


def test_cvserve_demo_dir_names_the_repository_folder_itself(tmp_path: Path) -> None:
    env = {"CVSERVE_HOME": "/var/lib/cvserve", "CVSERVE_DEMO_DIR": str(tmp_path / "demo")}
    assert paths.default_repository_path(env, _wheel(tmp_path)) == tmp_path / "demo" / "models.yaml"


def test_this_checkout_is_recognised() -> None:
    root = Path(__file__).resolve().parents[3]
    assert paths.cvserve_home({"HOME": "/nowhere"}) == root
