"""The hot modules, compiled with Cython when a C compiler is present, and a guard against stale builds.

``setup.py`` compiles each module in :data:`COMPILED` from its unchanged ``.py`` source (Cython's pure
Python mode; the ``.py`` stays the source of truth that ruff, mypy and the tests read). Where no C
compiler is available the build skips them and the same modules run as plain Python: same results,
about 20% more CPU per event in the worker (BENCHMARKS.md).

An in-place build (``pip install -e .``) leaves ``<module>.cpython-*.so`` next to ``<module>.py``, and
Python prefers the extension. After the source (or its augmenting ``.pxd``, which gives C types to the
same source's locals) is edited that extension is stale, so :func:`install` puts a finder first on
``sys.meta_path`` that loads the ``.py`` instead whenever either is newer than the extension (and logs
it). ``FRESHREC_PURE_PYTHON=1`` forces the plain modules everywhere (the differential tests compare both).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import logging
import os
import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import ModuleType

__all__ = ["COMPILED", "build", "install", "status"]

log = logging.getLogger(__name__)

#: modules on the worker's and the replayer's per-event path, compiled by setup.py (by path there)
COMPILED: tuple[str, ...] = (
    "streams.codec",
    "streams.core.state",
    "streams.core.serde",
    "streams.core.vectors",
    "streams.core.partition",
    "streams.worker",
    "replay.replayer",
    "replay._apply",
)

#: module -> the listed modules whose extension types (their fields' C layout) or C functions its .pxd cimports: it
#: can run compiled only with those modules' extensions, so it runs as its source whenever one of them does
CIMPORTS: dict[str, tuple[str, ...]] = {
    "streams.core.serde": ("streams.core.state",),
    "streams.worker": ("streams.core.state", "streams.codec"),
}

_ENV = "FRESHREC_PURE_PYTHON"
#: module name -> "compiled" | "pure" | "stale" (its source, or that of a module it cimports, is newer than the
#: extension) as imported
_loaded: dict[str, str] = {}


def _pure() -> bool:
    return os.environ.get(_ENV, "").strip().lower() not in ("", "0", "false", "no")


class _FreshOnly:
    """A meta path finder: a listed module's extension only when it is not older than its source."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname not in COMPILED:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.origin is None:
            return spec
        if not isinstance(spec.loader, importlib.machinery.ExtensionFileLoader):
            _loaded[fullname] = "pure"
            return spec
        ext = Path(spec.origin)
        src = ext.with_name(fullname.rpartition(".")[2] + ".py")
        if not src.exists():  # an installed wheel without sources: the extension is all there is
            _loaded[fullname] = "compiled"
            return spec
        # the extensions of the modules it cimports lie beside it, named alike (the same suffix, from the root)
        root, suffix = ext.parents[fullname.count(".")], ext.name[len(src.stem) :]
        deps = [root / (dep.replace(".", "/") + suffix) for dep in CIMPORTS.get(fullname, ())]
        stale = _stale(ext) or any(not dep.exists() or _stale(dep) for dep in deps)
        if not (stale or _pure()):
            _loaded[fullname] = "compiled"
            return spec
        if stale:
            _loaded[fullname] = "stale"
            log.warning(
                "%s or an extension it cimports is older than its source: running %s (rebuild: python3 dev.py setup)",
                ext.name, src,
            )  # fmt: skip
        else:
            _loaded[fullname] = "pure"
        pure = importlib.util.spec_from_file_location(fullname, src, submodule_search_locations=None)
        return pure


def _stale(ext: Path) -> bool:
    """Whether a compiled module's source (or its augmenting ``.pxd``, C types for the same source) is newer."""
    src = ext.with_name(ext.name.partition(".")[0] + ".py")
    if not src.exists():
        return False
    pxd = src.with_suffix(".pxd")
    newest = max(src.stat().st_mtime, pxd.stat().st_mtime if pxd.exists() else 0.0)
    return newest > ext.stat().st_mtime


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, _FreshOnly) for f in sys.meta_path):
        sys.meta_path.insert(0, _FreshOnly())


def status() -> dict[str, str]:
    """How each listed module that is imported so far was loaded: "compiled", "pure" or "stale"."""
    return {name: _loaded.get(name, "pure") for name in COMPILED if name in sys.modules}


def build() -> str:
    """One word for the imported listed modules: "compiled", "pure", "stale" or "mixed"."""
    kinds = set(status().values())
    return kinds.pop() if len(kinds) == 1 else "mixed" if kinds else "pure"
