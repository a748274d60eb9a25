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
import io
import os
import platform
import subprocess
import sys
import tokenize
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


METHOD = 2
"""How :func:`code_fingerprint` reads a Python file: 2 = its tokens without comments,
docstrings or layout, the same under every Python version; 1 (runs recorded before
``fingerprint_method`` was) = ``ast.dump`` without docstrings, which changes with the
Python version (see :func:`upgrade_markers`)."""


def _docstring_spans(tree: ast.AST) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """(start, end) positions of the strings :func:`_strip_docstrings` removes."""
    spans = []
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(body, list) and body and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            d = body[0]
            spans.append(((d.lineno, d.col_offset),
                          (d.end_lineno or d.lineno, d.end_col_offset or 0)))
    return spans


def code_text(source: str) -> str:
    """``source`` as the tokens that decide what it computes: no comments, docstrings,
    blank lines or spacing (indentation kept as block marks), every f-string as its
    source text — the same under every Python version (3.12 splits f-strings into tokens)."""
    spans = _docstring_spans(ast.parse(source))
    lines = source.splitlines(keepends=True)

    def segment(start: tuple[int, int], end: tuple[int, int]) -> str:
        (r0, c0), (r1, c1) = start, end
        if r0 == r1:
            return lines[r0 - 1][c0:c1]
        return lines[r0 - 1][c0:] + "".join(lines[r0:r1 - 1]) + lines[r1 - 1][:c1]

    out: list[str] = []
    depth, fstart, after_doc = 0, (0, 0), False
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.ENCODING, tokenize.ENDMARKER}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        name = tokenize.tok_name[tok.type]
        if name in ("FSTRING_START", "TSTRING_START"):
            if depth == 0:
                fstart = tok.start
            depth += 1
            continue
        if name in ("FSTRING_END", "TSTRING_END"):
            depth -= 1
            if depth == 0:
                out.append(segment(fstart, tok.end))
            continue
        if depth or tok.type in skip:
            continue
        if tok.type == tokenize.STRING and any(a <= tok.start and tok.end <= b
                                               for a, b in spans):
            after_doc = True
            continue
        if after_doc and tok.type == tokenize.NEWLINE:  # the docstring's statement end
            after_doc = False
            continue
        after_doc = False
        out.append({tokenize.NEWLINE: ";", tokenize.INDENT: "{",
                    tokenize.DEDENT: "}"}.get(tok.type, tok.string))
    return " ".join(out)


def _file_hash(path: Path, method: int = METHOD) -> str:
    text = path.read_text()
    if path.suffix == ".py":
        text = (code_text(text) if method == 2 else
                ast.dump(_strip_docstrings(ast.parse(text)), include_attributes=False))
    return hashlib.sha256(text.encode()).hexdigest()


@functools.lru_cache(maxsize=4)
def file_hashes(package: Path = PACKAGE, method: int = METHOD) -> dict[str, str]:
    """The hash of every covered file (Python by :data:`METHOD`: comments, docstrings and
    layout do not count; C as text), by path relative to ``package``; taken once per
    process."""
    return {p.relative_to(package).as_posix(): _file_hash(p, method)
            for p in source_files(package)}


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


def code_fingerprint(package: Path = PACKAGE, files: Iterable[str] | None = None,
                     method: int = METHOD) -> str:
    """A 16-hex-digit hash of the result-affecting source: of ``files`` (relative paths, as
    :func:`loaded_files` gives them), or of every covered file. A listed file that no
    longer exists counts as changed. ``method``: see :data:`METHOD`."""
    hashes = file_hashes(package, method)
    h = hashlib.sha256()
    for rel in sorted(hashes) if files is None else sorted(files):
        h.update(rel.encode() + b"\0" + hashes.get(rel, "missing").encode() + b"\0")
    return h.hexdigest()[:16]


@functools.cache
def code_version() -> str | None:
    """``DISTGRAD_CODE_VERSION`` when set (the commit a copy of the tree sent to another
    machine was made from), else the git commit of the checkout (with ``+dirty`` when it
    has changes), else None. Taken once per process, like :func:`file_hashes`: an edit to
    the checkout while runs go on does not change what they record."""
    if os.environ.get("DISTGRAD_CODE_VERSION"):
        return os.environ["DISTGRAD_CODE_VERSION"]
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        out = subprocess.run(["git", "describe", "--always", "--dirty=+dirty", "--abbrev=10"],
                             capture_output=True, text=True, check=True,
                             cwd=PACKAGE).stdout.strip()
        return out or None
    return None


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


def upgrade_markers(run_dirs: Iterable[Path], package: Path = PACKAGE) -> dict[str, int]:
    """Re-express the method-1 fingerprints of finished runs as method 2, where this code
    is proved to be the code that made them: run under the Python version a run recorded
    (its ``machine``), this recomputes the run's method-1 fingerprint over the files it
    loaded; only if that equals the recorded one is the marker given this code's method-2
    fingerprint (and ``fingerprint_upgraded`` says how). Runs made under another Python
    version, or by other code, are left as they are. Returns counts of each outcome."""
    import json

    here = ".".join(platform.python_version_tuple()[:2])
    counts = {"upgraded": 0, "other code": 0, "other python": 0, "already": 0}
    for run in run_dirs:
        path = Path(run) / "reproduce.json"
        if not path.exists():
            continue
        marker = json.loads(path.read_text())
        if marker.get("fingerprint_method", 1) == METHOD:
            counts["already"] += 1
            continue
        made = ".".join((marker.get("machine") or {}).get("python", "?").split(".")[:2])
        if made != here:
            counts["other python"] += 1
            continue
        files = marker.get("code_files")
        if marker.get("code_fingerprint") != code_fingerprint(package, files, method=1):
            counts["other code"] += 1
            continue
        marker.update(code_fingerprint=code_fingerprint(package, files, method=METHOD),
                      fingerprint_method=METHOD,
                      fingerprint_upgraded={"python": platform.python_version(),
                                            "method_1": marker["code_fingerprint"]})
        path.write_text(json.dumps(marker, indent=1) + "\n")
        counts["upgraded"] += 1
    return counts


if __name__ == "__main__":
    # python src/distgrad/reproduce/provenance.py upgrade RUN_DIR... (stdlib only: it runs
    # under the Python version the runs were made with, without distgrad's dependencies)
    if len(sys.argv) < 3 or sys.argv[1] != "upgrade":
        sys.exit("usage: python provenance.py upgrade RUN_DIR...")
    print(upgrade_markers(Path(a) for a in sys.argv[2:]))
