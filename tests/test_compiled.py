"""The Cython-compiled hot modules (streams/_compiled.py): same bytes as the plain modules, no stale builds."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from streams import _compiled

ROOT = Path(__file__).resolve().parents[1]

#: replays the golden log and a seeded synthetic one, then hashes every state's full encoding (vectors
#: included), the DLQ and the counters, and says how the modules were loaded
_DIGEST = """
import hashlib, sys
sys.path.insert(0, {root!r})
from replay.readers import LogRecord, read_jsonl_log
from replay.replayer import replay_records
from streams import _compiled
from streams.core import serde
from streams.core.state import CoreConfig
from streams.producer import synthetic_events
from tests.replay.make_golden import GOLDEN

h = hashlib.sha256()
synthetic = [
    LogRecord(r.key, r.value, r.ts_us, i % 3, i)
    for i, r in enumerate(synthetic_events(20_000, 300, 400, seed=5, start_us=1_790_000_000_000_000, bad_every=97))
]
for records, batch in ((list(read_jsonl_log(GOLDEN, 3)), 700), (synthetic, 5000), (synthetic, 333)):
    res = replay_records(records, CoreConfig(dim=16), 3, batch_size=batch)
    for uid in sorted(res.users):
        h.update(uid.encode() + serde.encode_user(res.users[uid]))
    for iid in sorted(res.items):
        h.update(iid.encode() + serde.encode_item(res.items[iid]))
    for raw, reason in res.dlq:
        h.update(raw + reason.encode())
    h.update(repr((res.events, res.duplicates, res.redelivered, res.forwards, res.batches)).encode())
print(sorted(set(_compiled.status().values())), h.hexdigest())
"""


def _digest(pure: bool) -> tuple[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "FRESHREC_PURE_PYTHON"}
    if pure:
        env["FRESHREC_PURE_PYTHON"] = "1"
    out = subprocess.run(
        [sys.executable, "-c", _DIGEST.format(root=str(ROOT))], env=env, cwd=ROOT,
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    kinds, digest = out.stdout.strip().rsplit(" ", 1)
    return kinds, digest


def _compiled_here() -> bool:
    return any(ROOT.glob("streams/core/state.*.so"))


@pytest.mark.skipif(not _compiled_here(), reason="no compiled build here (no C compiler at install time)")
def test_the_compiled_modules_give_the_same_bytes_as_the_plain_ones() -> None:
    compiled_kinds, compiled = _digest(pure=False)
    pure_kinds, pure = _digest(pure=True)
    assert compiled_kinds == "['compiled']"  # every listed module came from its extension
    assert pure_kinds == "['pure']"
    assert compiled == pure


@pytest.mark.skipif(not _compiled_here(), reason="no compiled build here (no C compiler at install time)")
def test_an_extension_older_than_its_source_is_not_imported(tmp_path: Path) -> None:
    copy = tmp_path / "tree"
    shutil.copytree(ROOT / "streams", copy / "streams", ignore=shutil.ignore_patterns("__pycache__"))
    src = copy / "streams" / "codec.py"
    ext = next((copy / "streams").glob("codec.*.so"))
    os.utime(ext, (1_000_000_000, 1_000_000_000))  # the source was edited after the build
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import streams.codec as c, streams.core.state as s;"
        "from streams import _compiled; print(c.__file__, s.__file__, _compiled.status()['streams.codec'])"
    )
    out = subprocess.run([sys.executable, "-c", code, str(copy)], capture_output=True, text=True, check=True)
    codec_file, state_file, kind = out.stdout.split()
    assert codec_file == str(src) and kind == "stale"
    assert state_file.endswith(".so")  # the fresh extensions still load
    assert "older than" in out.stderr  # and the fallback is logged


@pytest.mark.skipif(not _compiled_here(), reason="no compiled build here (no C compiler at install time)")
def test_a_module_runs_as_its_source_when_a_module_it_cimports_does(tmp_path: Path) -> None:
    # serde and the worker read the states' fields as the compiled state module's C struct members: with
    # state.py newer than its extension they cannot run compiled against the plain UserState
    copy = tmp_path / "tree"
    shutil.copytree(ROOT / "streams", copy / "streams", ignore=shutil.ignore_patterns("__pycache__"))
    os.utime(next((copy / "streams" / "core").glob("state.*.so")), (1_000_000_000, 1_000_000_000))
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import streams.worker;"
        "from streams.core import serde; from streams.core.state import UserState; from streams import _compiled;"
        "assert serde.decode_user(serde.encode_user(UserState(max_ts=3))).max_ts == 3; print(_compiled.status())"
    )
    out = subprocess.run([sys.executable, "-c", code, str(copy)], capture_output=True, text=True, check=True)
    status = ast.literal_eval(out.stdout)
    assert status["streams.core.state"] == status["streams.core.serde"] == status["streams.worker"] == "stale"
    assert status["streams.codec"] == "compiled"  # the modules that cimport nothing still load compiled
    assert set(_compiled.CIMPORTS) <= set(_compiled.COMPILED)
    assert all(set(deps) <= set(_compiled.COMPILED) for deps in _compiled.CIMPORTS.values())


def test_the_listed_modules_exist() -> None:
    for name in _compiled.COMPILED:
        assert (ROOT / (name.replace(".", "/") + ".py")).is_file(), name


def test_a_machine_without_a_c_compiler_still_builds_and_runs_plain_python(tmp_path: Path) -> None:
    copy = tmp_path / "tree"
    for part in ("streams", "replay"):
        shutil.copytree(ROOT / part, copy / part, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, copy / name)
    if (ROOT / "build" / "cython").is_dir():  # the generated C, if any: saves regenerating it
        shutil.copytree(ROOT / "build" / "cython", copy / "build" / "cython")
    env = {**os.environ, "CC": "/bin/false", "LDSHARED": "/bin/false"}  # every compile fails
    out = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=copy, env=env,
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "failed" in out.stderr  # each module's compile failed and was skipped
    assert not list(copy.rglob("*.so"))
    code = "import streams.worker, replay.replayer; from streams import _compiled; print(_compiled.build())"
    run = subprocess.run([sys.executable, "-c", code], cwd=copy, capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "pure"
