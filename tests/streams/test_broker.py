"""The embedded broker's process lifetime."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
from streams.broker import EmbeddedBroker, free_port
b = EmbeddedBroker(port=free_port()).start()
print(b.pid, flush=True)
raise RuntimeError("the owner fails without calling stop()")
"""


def _running_tansu(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return b"tansu" in cmdline and stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_a_broker_started_outside_a_with_block_stops_when_its_interpreter_exits_on_an_error() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert proc.returncode == 1 and "the owner fails" in proc.stderr
    pid = int(proc.stdout.split()[0])
    deadline = time.monotonic() + 5
    while _running_tansu(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    alive = _running_tansu(pid)
    if alive:
        os.kill(pid, 9)
    assert not alive, "the Tansu process outlived the interpreter that started it"
