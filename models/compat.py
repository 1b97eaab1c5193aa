"""Compatibility for detectron2 v0.6 on current numpy, Pillow and torch.

This is the one module that adapts the environment for detectron2. Importing it
changes nothing: :func:`apply` does, and it is called explicitly where detectron2 is
loaded (``build_model``, the CLI, a spawned training process, the test suite's
conftest), before the first detectron2 import.

What it does, each only where needed:

* ``detectron2._C``: the pure-Python build has no C++ extension. A meta-path finder,
  placed *after* every real finder, supplies a stand-in module only when no real
  ``detectron2._C`` can be found. Using any op of it raises :class:`MissingOpError`
  naming the op and why it is unavailable. A build with the extension is untouched.
* ``MapDataset`` (detectron2/data/common.py) picks a fallback item for one its mapper
  skipped with ``random.sample`` on a set, which Python 3.11 refuses: any training whose
  mapper skips an image crashed. Its random generator is replaced by one that samples a
  set's sorted members, mended right after detectron2 loads that module (a post-import
  hook) or at once if it is loaded already. Where the source no longer does this, nothing
  changes.
* numpy aliases (``np.int``, ``np.float``, ``np.str``, ``np.object``, ``np.bool``)
  removed in numpy 1.24 and ``PIL.Image.LINEAR`` removed in Pillow 10 are used by
  v0.6 code. They are restored only when missing *and* the installed detectron2
  source still uses them, so an upstream detectron2 (which no longer does) sees an
  unchanged numpy and Pillow.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import random
import sys
import types
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["MissingOpError", "apply", "has_native_ops"]

_NUMPY_ALIASES = {"int": int, "float": float, "str": str, "object": object, "bool": bool}
# v0.6 files that use the removed names; a newer detectron2 changed all of them.
_NUMPY_USERS = ("evaluation/sem_seg_evaluation.py", "structures/masks.py", "data/build.py")
_PIL_USERS = ("data/transforms/transform.py",)

_DISPATCHER_OPS = ("nms_rotated",)

_applied = False


class MissingOpError(RuntimeError):
    """A detectron2 C++/CUDA op was used but this detectron2 build has no ``_C`` extension."""


class _MissingNativeOps(types.ModuleType):
    """Stand-in for ``detectron2._C`` whose every attribute is an op that cannot run."""

    __file__ = None
    _CVSERVE_STUB = True

    def __getattr__(self, op: str) -> Any:
        if op.startswith("__"):
            raise AttributeError(op)

        def unavailable(*args: Any, **kwargs: Any) -> Any:
            raise MissingOpError(
                f"detectron2 op '_C.{op}' is unavailable: this detectron2 was built without its C++/CUDA "
                "extension (rotated boxes, deformable convolution and detectron2's fast COCOeval need it). "
                "Install detectron2 built from source with its extension to use this model."
            )

        unavailable.__name__ = op
        return unavailable


class _NativeOpsFallback(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``detectron2._C`` only after every other finder failed to."""

    def find_spec(
        self, fullname: str, path: Any, target: Any = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "detectron2._C":
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return _MissingNativeOps(spec.name)

    def exec_module(self, module: types.ModuleType) -> None:
        # v0.6 also calls one op through torch's dispatcher (torch.ops.detectron2.*), which
        # would fail with an obscure AttributeError; give it the same clear error.
        torch = sys.modules.get("torch")
        if torch is not None:
            namespace = torch.ops.detectron2
            for op in _DISPATCHER_OPS:
                setattr(namespace, op, getattr(module, op))


def _detectron2_source_uses(relative_paths: tuple[str, ...], needle: str) -> bool:
    spec = importlib.util.find_spec("detectron2")
    if spec is None or not spec.submodule_search_locations:
        return False
    root = Path(next(iter(spec.submodule_search_locations)))
    for rel in relative_paths:
        try:
            if needle in (root / rel).read_text(encoding="utf-8"):
                return True
        except OSError:
            continue
    return False


def _restore_numpy_aliases() -> None:
    import numpy as np

    missing = [name for name in _NUMPY_ALIASES if name not in np.__dict__]
    if missing and _detectron2_source_uses(_NUMPY_USERS, "dtype=np.int)"):
        for name in missing:
            setattr(np, name, _NUMPY_ALIASES[name])


def _restore_pillow_linear() -> None:
    from PIL import Image

    if not hasattr(Image, "LINEAR") and _detectron2_source_uses(_PIL_USERS, "Image.LINEAR"):
        Image.LINEAR = Image.BILINEAR  # type: ignore[attr-defined]


class _SetSamplingRandom(random.Random):
    """``random.Random`` whose ``sample`` also takes a set (in sorted order, so deterministic)."""

    def sample(self, population: Any, k: int, *, counts: Any = None) -> list[Any]:
        if isinstance(population, set | frozenset):
            population = sorted(population)
        return super().sample(population, k, counts=counts)


def _mend_map_dataset(module: types.ModuleType) -> None:
    cls = getattr(module, "MapDataset", None)
    if cls is None or getattr(cls, "_cvserve_mended", False):
        return
    init = cls.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        self._rng = _SetSamplingRandom(42)

    cls.__init__ = __init__
    cls._cvserve_mended = True


# module name -> (mend, source file under detectron2/, text whose presence says the mend is needed)
_MENDS: dict[str, tuple[Callable[[types.ModuleType], None], str, str]] = {
    "detectron2.data.common": (
        _mend_map_dataset, "data/common.py", "self._rng.sample(self._fallback_candidates"
    ),
}


class _MendAfterImport(importlib.abc.MetaPathFinder):
    """Runs a mend on a detectron2 module right after the module's own code has run."""

    def __init__(self, mends: dict[str, Callable[[types.ModuleType], None]]) -> None:
        self._mends = mends

    def find_spec(
        self, fullname: str, path: Any, target: Any = None
    ) -> importlib.machinery.ModuleSpec | None:
        mend = self._mends.get(fullname)
        if mend is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _MendingLoader(spec.loader, mend)
                return spec
        return None


class _MendingLoader(importlib.abc.Loader):
    def __init__(self, loader: Any, mend: Callable[[types.ModuleType], None]) -> None:
        self._loader, self._mend = loader, mend

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self._loader.create_module(spec)  # type: ignore[no-any-return]

    def exec_module(self, module: types.ModuleType) -> None:
        self._loader.exec_module(module)
        self._mend(module)


def _install_mends() -> None:
    if sys.version_info < (3, 11):
        return
    pending: dict[str, Callable[[types.ModuleType], None]] = {}
    for name, (mend, source, needle) in _MENDS.items():
        if not _detectron2_source_uses((source,), needle):
            continue
        if name in sys.modules:
            mend(sys.modules[name])
        else:
            pending[name] = mend
    if pending and not any(isinstance(f, _MendAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _MendAfterImport(pending))


def _quiet_known_warnings() -> None:
    # Deprecation notices that detectron2 v0.6 triggers in torch and setuptools on every
    # start; they say nothing a user of cvserve can act on.
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
    warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message="torch.meshgrid: in an upcoming release", category=UserWarning)


def apply() -> None:
    """Apply the compatibility measures once; safe to call any number of times."""
    global _applied
    if _applied:
        return
    _quiet_known_warnings()
    if not any(isinstance(f, _NativeOpsFallback) for f in sys.meta_path):
        sys.meta_path.append(_NativeOpsFallback())
    _restore_numpy_aliases()
    _restore_pillow_linear()
    _install_mends()
    _applied = True


def has_native_ops() -> bool:
    """Whether the installed detectron2 has its compiled ``_C`` extension."""
    apply()
    try:
        from detectron2 import _C
    except ImportError:
        return False
    return not getattr(_C, "_CVSERVE_STUB", False)
