#!/usr/bin/env python3
"""Install detectron2 v0.6 (pure Python build) from the package registry, hash-pinned.

detectron2 is not published on PyPI under its own name. ``pb1-detectron2==0.6`` is a
republished sdist whose ``.py`` files are byte-identical to upstream v0.6, but it ships
no C++ sources and keeps the model-zoo configs where its ``setup.py`` does not look.
This script downloads that sdist from the configured index, refuses it unless its
sha256 matches the pin, builds a wheel without the C++ extension, with the model-zoo
configs packaged, and installs it into the running interpreter's environment.

Only the standard library is used, so it runs before anything else is installed.
It needs ``torch`` importable (detectron2's setup.py imports it).

Usage: python scripts/install_detectron2.py [--cache DIR] [--force]
"""

from __future__ import annotations

import argparse
import hashlib
import html.parser
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

DIST = "pb1-detectron2"
VERSION = "0.6"
SDIST = f"{DIST}-{VERSION}.tar.gz"
SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
DEFAULT_INDEX = "https://pypi.org/simple"


class _Links(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            for key, value in attrs:
                if key == "href" and value:
                    self.hrefs.append(value)


def _index_urls() -> list[str]:
    """The simple index to use: $PIP_INDEX_URL, pip's configured index, else PyPI."""
    env = os.environ.get("PIP_INDEX_URL")
    if env:
        return [env]
    try:
        out = subprocess.run(
            [sys.executable, "-m", "pip", "config", "get", "global.index-url"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    except OSError:
        out = ""
    urls = [out] if out.startswith("http") else []
    return [*urls, DEFAULT_INDEX]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(cache: Path) -> Path:
    """Return the verified sdist, downloading it into ``cache`` when absent."""
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / SDIST
    if target.exists() and _sha256(target) == SHA256:
        return target
    errors = []
    for index in _index_urls():
        page = f"{index.rstrip('/')}/{DIST}/"
        try:
            with urllib.request.urlopen(page, timeout=60) as resp:
                parser = _Links()
                parser.feed(resp.read().decode("utf-8", "replace"))
        except OSError as e:
            errors.append(f"{page}: {e}")
            continue
        for href in parser.hrefs:
            url = urllib.parse.urljoin(page, href)
            if urllib.parse.urlparse(url).path.endswith("/" + SDIST):
                tmp = target.with_suffix(".part")
                with urllib.request.urlopen(url.split("#")[0], timeout=300) as resp, tmp.open("wb") as f:
                    shutil.copyfileobj(resp, f)
                got = _sha256(tmp)
                if got != SHA256:
                    tmp.unlink()
                    raise SystemExit(f"{SDIST}: sha256 {got} does not match the pin {SHA256}; refusing it")
                tmp.replace(target)
                return target
        errors.append(f"{page}: no link to {SDIST}")
    raise SystemExit("could not download " + SDIST + ":\n  " + "\n  ".join(errors))


def patch_source(src: Path) -> None:
    """Build without the C++ extension and package the model-zoo configs."""
    setup_py = src / "setup.py"
    text = setup_py.read_text()
    patched, n = re.subn(r"ext_modules=get_extensions\(\),", "ext_modules=[],", text)
    if n != 1:
        raise SystemExit(f"{setup_py}: expected one 'ext_modules=get_extensions(),' to patch, found {n}")
    setup_py.write_text(patched)
    configs = src / "configs"
    zoo_configs = src / "detectron2" / "model_zoo" / "configs"
    if not configs.exists():
        shutil.copytree(zoo_configs, configs)


def installed_version() -> str | None:
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover
        return None
    try:
        return version(DIST)
    except PackageNotFoundError:
        return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "cvserve")
    parser.add_argument("--force", action="store_true", help="reinstall even if present")
    args = parser.parse_args()
    if installed_version() == VERSION and not args.force:
        print(f"{DIST}=={VERSION} already installed")
        return 0
    sdist = download(args.cache)
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        src = Path(tmp) / f"{DIST}-{VERSION}"
        patch_source(src)
        wheels = Path(tmp) / "wheels"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "--no-deps",
                "--no-build-isolation",
                "-w",
                str(wheels),
                str(src),
            ],
            check=True,
        )
        wheel = next(wheels.glob("*.whl"))
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", str(wheel)], check=True)
    print(f"installed {DIST}=={VERSION} (pure Python build, model-zoo configs packaged)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
