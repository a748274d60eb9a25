"""Which code made a run: the code version and a fingerprint of the code that affects results.

A reproduction reuses finished runs. A run made by older code must not pass for a run of
this code, so every run records :func:`code_fingerprint` — a hash of the source that
decides what a run computes (algorithms, server, workers, engines' scheduling, models, data,
the C kernels), with docstrings and comments removed so that documentation edits do not
invalidate hours of runs — and :func:`code_version` (the git commit, when there is one).
:func:`code_fingerprint` leaves out what only presents results (the CLI, plots, reports,
this package's claim checks) and the engines a reproduction does not use (Ray, Spark, the
network transport).
"""

from __future__ import annotations

import ast
import contextlib
import functools
import hashlib
import subprocess
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent
"""The ``distgrad`` package directory."""

EXCLUDED = ("cli.py", "__main__.py", "spark.py", "report/", "reproduce/", "transport/",
            "engines/ray.py", "engines/spark.py", "engines/net.py")
"""Paths (relative to the package, a trailing / for a directory) left out of the
fingerprint: they present results or run engines a reproduction does not use."""


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(body, list) and body and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]  # type: ignore[attr-defined]
    return tree


def source_files(package: Path = PACKAGE) -> list[Path]:
    """The files the fingerprint covers, sorted."""
    files = []
    for path in sorted([*package.rglob("*.py"), *package.rglob("*.c")]):
        rel = path.relative_to(package).as_posix()
        if "__pycache__" in rel or any(rel == e or (e.endswith("/") and rel.startswith(e))
                                       for e in EXCLUDED):
            continue
        files.append(path)
    return files


@functools.lru_cache(maxsize=4)
def code_fingerprint(package: Path = PACKAGE) -> str:
    """A 16-hex-digit hash of the result-affecting source (Python as its AST without
    docstrings, so comments, docstrings and formatting do not count; C as text)."""
    h = hashlib.sha256()
    for path in source_files(package):
        text = path.read_text()
        if path.suffix == ".py":
            text = ast.dump(_strip_docstrings(ast.parse(text)), include_attributes=False)
        h.update(path.relative_to(package).as_posix().encode() + b"\0")
        h.update(text.encode() + b"\0")
    return h.hexdigest()[:16]


def code_version() -> str | None:
    """The git commit of the checkout (with ``+dirty`` when it has changes), or None."""
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        out = subprocess.run(["git", "describe", "--always", "--dirty=+dirty", "--abbrev=10"],
                             capture_output=True, text=True, check=True,
                             cwd=PACKAGE).stdout.strip()
        return out or None
    return None
