"""Which code made a run: the code version and a fingerprint of the code that affects results.

A reproduction reuses finished runs. A run made by older code must not pass for a run of
this code, so every run records :func:`code_fingerprint` — a hash of the source that
decides what a run computes (algorithms, server, workers, engines' scheduling, models, data,
the C kernels), with docstrings and comments removed so that documentation edits do not
invalidate hours of runs — and :func:`code_version` (the git commit, when there is one).
:func:`code_fingerprint` leaves out what only presents results (the CLI, plots, reports,
this package's claim checks) and the engines a reproduction does not use (Ray, Spark, the
network transport).

A run records the fingerprint of the files its process had loaded (:func:`loaded_files`,
with the C kernels always in): an edit to a module a run never imported (the multi-host
worker loop, a language-model dataset for an MNIST run) does not make it stale. The hashes
are of the source as it was when this process first took them (:func:`file_hashes`), so an
edit made while a long reproduction runs is not credited to its runs.

A run also records the :func:`machine` it was made on, so a page built from runs made
elsewhere (a larger machine that ran a grid in parallel) says so.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import hashlib
import os
import platform
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

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


def _file_hash(path: Path) -> str:
    text = path.read_text()
    if path.suffix == ".py":
        text = ast.dump(_strip_docstrings(ast.parse(text)), include_attributes=False)
    return hashlib.sha256(text.encode()).hexdigest()


@functools.lru_cache(maxsize=4)
def file_hashes(package: Path = PACKAGE) -> dict[str, str]:
    """The hash of every covered file (Python as its AST without docstrings, so comments,
    docstrings and formatting do not count; C as text), by path relative to ``package``;
    taken once per process."""
    return {p.relative_to(package).as_posix(): _file_hash(p) for p in source_files(package)}


def loaded_files(package: Path = PACKAGE) -> list[str]:
    """The covered files of the modules this process has imported, and every C kernel
    (relative paths, sorted)."""
    covered = file_hashes(package)
    files = {rel for rel in covered if rel.endswith(".c")}
    for module in list(sys.modules.values()):
        origin = getattr(module, "__file__", None)
        if not origin:
            continue
        try:
            rel = Path(origin).resolve().relative_to(package).as_posix()
        except ValueError:
            continue
        if rel in covered:
            files.add(rel)
    return sorted(files)


def code_fingerprint(package: Path = PACKAGE, files: Iterable[str] | None = None) -> str:
    """A 16-hex-digit hash of the result-affecting source: of ``files`` (relative paths, as
    :func:`loaded_files` gives them), or of every covered file. A listed file that no
    longer exists counts as changed."""
    hashes = file_hashes(package)
    h = hashlib.sha256()
    for rel in sorted(hashes) if files is None else sorted(files):
        h.update(rel.encode() + b"\0" + hashes.get(rel, "missing").encode() + b"\0")
    return h.hexdigest()[:16]


def code_version() -> str | None:
    """The git commit of the checkout (with ``+dirty`` when it has changes); where there is
    no git checkout (a copy of the tree sent to another machine), ``DISTGRAD_CODE_VERSION``
    if set (the commit the copy was made from), else None."""
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        out = subprocess.run(["git", "describe", "--always", "--dirty=+dirty", "--abbrev=10"],
                             capture_output=True, text=True, check=True,
                             cwd=PACKAGE).stdout.strip()
        if out:
            return out
    return os.environ.get("DISTGRAD_CODE_VERSION") or None


def machine() -> dict[str, Any]:
    """What the numbers were measured on: CPU, cores, Python, torch (and its threads),
    distgrad, the commit and the OS."""
    import torch

    import distgrad

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commit = None
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True, cwd=PACKAGE).stdout.strip() or None
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "distgrad": distgrad.__version__, "commit": commit,
            "threads": torch.get_num_threads(), "os": platform.platform(terse=True)}


def machine_line(m: dict[str, Any]) -> str:
    commit = f" (commit {m['commit']})" if m.get("commit") else ""
    return (f"{m['cpu']}, {m['cores']} cores, torch {m['torch']} with {m['threads']} "
            f"thread(s), Python {m['python']}, distgrad {m['distgrad']}{commit}, {m['os']}")
