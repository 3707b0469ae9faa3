"""Optional Cython build of the hot modules (see streams/_compiled.py); everything else is in pyproject.toml.

Each module is compiled from its unchanged ``.py`` source. Without a C compiler (or with
``FRESHREC_NO_COMPILE=1``) the extensions are skipped and the package runs as plain Python.
"""

from __future__ import annotations

import os
import runpy
from pathlib import Path

from setuptools import Extension, setup

ROOT = Path(__file__).resolve().parent


def _extensions() -> list[Extension]:
    if os.environ.get("FRESHREC_NO_COMPILE", "").strip() not in ("", "0"):
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:  # a build without the build-system requirements: plain Python
        return []
    compiled = runpy.run_path(str(ROOT / "streams" / "_compiled.py"))["COMPILED"]
    exts = [Extension(name, [name.replace(".", "/") + ".py"]) for name in compiled]
    built = list(
        cythonize(
            exts,
            build_dir="build/cython",
            quiet=True,
            compiler_directives={
                "language_level": 3,
                # annotations document types for mypy; they are not C declarations (a defaultdict
                # passed where ``dict`` is annotated must stay valid)
                "annotation_typing": False,
                "binding": True,
                # a None where a typed extension object is expected (a state, an Outcome) raises, as in the
                # plain build, instead of reading its fields from None's memory (a compare per field access)
                "nonecheck": True,
            },
        )
    )
    for ext in built:  # cythonize returns new Extension objects, without the template's ``optional``
        ext.optional = True  # a failed compile (no C compiler) skips the module: it runs as plain Python
    return built


setup(ext_modules=_extensions())
