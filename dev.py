#!/usr/bin/env python3
"""Bootstrap and run freshrec with nothing but Python and pip.

    python3 dev.py demo    # set up, then run broker + workers + API + demo stream
    python3 dev.py test    # set up, then run the test suite (what .ci/run calls)

Creates ``.venv`` next to this file on first use and installs the project into it
(``pip install -e .[dev]``); later runs reuse it and only reinstall when
pyproject.toml changed.
"""

from __future__ import annotations

import hashlib
import os
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
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.exists() and STAMP.read_text() == want:
        return
    _run(str(PY), "-m", "pip", "install", "--quiet", "--upgrade", "pip")
    # torch first, pinned, so that nothing pulls a multi-GB CUDA build
    _run(str(PY), "-m", "pip", "install", "--quiet", "torch==2.13.0")
    _run(str(PY), "-m", "pip", "install", "--quiet", "-e", ".[dev]")
    STAMP.write_text(want)


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
