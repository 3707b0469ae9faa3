#!/usr/bin/env python3
"""Bootstrap and run freshrec with nothing but Python and pip.

    python3 dev.py demo    # set up, then run broker + workers + API + demo stream
    python3 dev.py test    # set up, then run the test suite (what .ci/run calls)

Creates ``.venv`` next to this file on first use and installs the project into it
(``pip install -e .[dev]``, which also compiles the hot modules with Cython where a C
compiler is present); later runs reuse it, reinstall when pyproject.toml changed and
rebuild when a compiled module's source changed.
"""

from __future__ import annotations

import hashlib
import os
import runpy
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / "python"
STAMP = VENV / ".freshrec-installed"


def _run(*cmd: str) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def setup() -> None:
    """Create the virtualenv and install the project, unless it is up to date."""
    if sys.version_info < (3, 11):  # noqa: UP036  # dev.py runs on whatever python3 the machine has
        sys.exit(f"freshrec needs Python >= 3.11, this is {sys.version.split()[0]}")
    if not PY.exists():
        print(f"creating virtualenv {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    deps = _digest([ROOT / "pyproject.toml"])
    # the hot modules are compiled in place (setup.py); a changed source needs a rebuild, not new packages
    code = _digest([ROOT / "setup.py", *_compiled_sources()])
    have = STAMP.read_text().split() if STAMP.exists() else []
    if have == [deps, code] and not _stale_extensions():
        return
    if not have or have[0] != deps:
        _run(str(PY), "-m", "pip", "install", "--quiet", "--upgrade", "pip")
        # torch first, pinned, so that nothing pulls a multi-GB CUDA build
        _run(str(PY), "-m", "pip", "install", "--quiet", "torch==2.13.0")
        _run(str(PY), "-m", "pip", "install", "--quiet", "-e", ".[dev]")
    else:
        _run(str(PY), "-m", "pip", "install", "--quiet", "--no-deps", "-e", ".")
    STAMP.write_text(f"{deps} {code}")


def _compiled_sources() -> list[Path]:
    """The sources setup.py compiles (streams/_compiled.py lists their modules)."""
    names: tuple[str, ...] = runpy.run_path(str(ROOT / "streams" / "_compiled.py"))["COMPILED"]
    sources = [ROOT / (n.replace(".", "/") + ".py") for n in names]
    pxds = [p for p in (s.with_suffix(".pxd") for s in sources) if p.exists()]  # C types for the same sources
    return [ROOT / "streams" / "_compiled.py", *sources, *pxds]


def _stale_extensions() -> bool:
    """Whether a compiled module's extension is older than its source (a checkout touched it)."""
    for src in _compiled_sources()[1:]:
        for ext in src.parent.glob(src.stem + ".cpython-*.so"):
            if ext.stat().st_mtime < src.stat().st_mtime:
                return True
    return False


def _digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for path in paths:
        h.update(path.read_bytes())
    return h.hexdigest()


def main() -> int:
    """Entry point."""
    if len(sys.argv) < 2 or sys.argv[1] not in {"demo", "test", "setup"}:
        print(__doc__)
        return 2
    cmd, rest = sys.argv[1], sys.argv[2:]
    setup()
    if cmd == "setup":
        return 0
    if cmd == "demo":
        return subprocess.call([str(BIN / "freshrec"), "demo", *rest], cwd=ROOT)
    if not rest:  # the full check, as CI runs it: lint, types, then the tests
        for check in (["ruff", "check", "."], ["ruff", "format", "--check", "."], ["mypy"]):
            print("+", " ".join(check), flush=True)
            if subprocess.call([str(PY), "-m", *check], cwd=ROOT) != 0:
                return 1
    return subprocess.call([str(PY), "-m", "pytest", *rest], cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main())
