"""Turn the results of an experiment into ``report.md`` with its figures beside it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distgrad.reproduce.provenance import machine_line
from distgrad.reproduce.spec import Claim, Results, Verdict

HOLDS_MARK = {True: "✅ holds", False: "❌ does not hold", None: "➖ not tested"}


def pct(v: float | None, digits: int = 2) -> str:
    """An accuracy in [0, 1] as a percentage, as the thesis prints them."""
    return "n/a" if v is None else f"{100 * v:.{digits}f} %"


def num(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _partial(results: Results, fn: Any, fallback: Any) -> Any:
    """``fn(results)``; with runs missing, ``fallback`` where it needs one of them (or has
    nothing to show)."""
    if not results.data.get("missing"):
        return fn(results)
    try:
        return fn(results)
    except (KeyError, ValueError, IndexError, ZeroDivisionError):
        return fallback


def evaluate_claims(results: Results) -> list[tuple[Claim, Verdict]]:
    """Every claim of the experiment with its verdict on these results. With runs missing
    (a partial, resumable experiment), a claim that needs one is "not tested"."""
    missing = results.data.get("missing") or []
    out = []
    for c in results.experiment.claims:
        try:
            out.append((c, c.check(results)))
        except (KeyError, ValueError, IndexError, ZeroDivisionError):
            if not missing:
                raise
            out.append((c, Verdict(f"{len(missing)} run(s) not finished yet", None,
                                   "waiting for " + ", ".join(missing[:4])
                                   + (" …" if len(missing) > 4 else ""))))
    return out


def host_line(m: dict[str, Any]) -> str:
    """A machine as far as it decides a run's numbers and speed (no commit or threads)."""
    return f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}, Python {m['python']}, {m['os']}"


def run_machines(results: Results | list[Results]) -> dict[str, int]:
    """How many runs each machine made (:func:`host_line`; ``"not recorded"`` for runs from
    before machines were recorded), each run counted once however many experiments read
    it."""
    counts: dict[str, int] = {}
    seen: set[Any] = set()
    for r in results if isinstance(results, list) else [results]:
        for label, run in r.runs.items():
            key = run.path or (r.experiment.name, label)
            if key in seen:
                continue
            seen.add(key)
            line = host_line(run.machine) if run.machine else "not recorded"
            counts[line] = counts.get(line, 0) + 1
    return counts


def runs_made_on(results: Results | list[Results], here: dict[str, Any] | None) -> str:
    """Where the runs were made, when any was made on another machine than ``here`` (the
    one writing the report): "MACHINE (N runs); ..."; "" otherwise."""
    counts = run_machines(results)
    if set(counts) <= {None if here is None else host_line(here), "not recorded"}:
        return ""
    return "; ".join(f"{line} ({k} run{'s' if k != 1 else ''})"
                     for line, k in sorted(counts.items(), key=lambda kv: -kv[1]))


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def claims_table(verdicts: list[tuple[Claim, Verdict]]) -> str:
    rows = ["| claim | condition | thesis | ours | verdict |", "|---|---|---|---|---|"]
    for claim, v in verdicts:
        verdict = HOLDS_MARK[v.holds] + (f" — {_escape(v.note)}" if v.note else "")
        rows.append(f"| {claim.id} | {_escape(claim.text)} | {_escape(claim.thesis)} | "
                    f"{_escape(v.ours)} | {verdict} |")
    return "\n".join(rows)


def runs_table(results: Results) -> str:
    rows = ["| run | algorithm | n | λ | epochs | commits | mean τ | virtual s | wall s | "
            "test acc. (center) | train acc. (center) | last-batch train acc. (thesis) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, run in results.runs.items():
        s = run.summary
        virtual = s.get("virtual_seconds")
        name = label + ("" if not run.stale else " (STALE: older code)" if not run.replayed
                        else f" (STALE: older code; its first {run.replayed} epoch(s) replayed "
                             "identically by this code)")
        rows.append(
            f"| {name} | {s['algorithm']} | {s['workers']} | {s['window']} | {s['epochs']} | "
            f"{s['commits']} | {num(s.get('staleness_mean'), 1)} | "
            f"{'n/a' if virtual is None else f'{virtual:.1f}'} | {s['wall_seconds']:.0f} | "
            f"{pct(s.get('test_accuracy'))} | {pct(s.get('train_accuracy'))} | "
            f"{pct(s.get('last_batch_train_accuracy'))} |")
    return "\n".join(rows)


def scale_line(results: Results) -> str:
    exp, scale = results.experiment, results.scale
    if exp.execute is not None:
        return f"scale `{scale}`" + (f": {exp.describe(scale)}" if exp.describe else "")
    setup = exp.setup(scale)
    data = (f"first {setup.train_samples} MNIST training images" if setup.train_samples
            else "all 60,000 MNIST training images")
    model = {"mlp": "the thesis MLP (784-1000-2000-1000-10)", "small": "a 784-64-10 MLP",
             "tiny": "a 784-32-10 MLP"}[setup.model]
    epochs = sorted({s.epochs_at(setup) for s in exp.run_specs(scale)})
    return (f"scale `{scale}`: {model}, {data}, batch {setup.batch_size}, "
            f"{'/'.join(map(str, epochs))} epoch(s) split over the workers, center evaluated "
            f"on the 10,000 test images every {setup.eval_every:g} epoch")


def render(results: Results, verdicts: list[tuple[Claim, Verdict]],
           figures: list[tuple[str, str]], *, command: str | None = None,
           machine_info: dict[str, Any] | None = None, heading: str = "#",
           commands: list[tuple[str, str]] | None = None) -> str:
    """The markdown of one experiment's report. ``figures`` are (file, caption) pairs."""
    exp = results.experiment
    sub = heading + "#"
    lines = [f"{heading} `{exp.name}` — {exp.shows}", ""]
    lines.append(f"*Thesis:* {exp.thesis}  ")
    lines.append(f"*Setup:* {scale_line(results)}; seed {exp.seed}  ")
    if results.wall_seconds:
        lines.append(f"*Compute:* {results.wall_seconds / 60:.1f} min of wall time  ")
    if machine_info:
        lines.append(f"*Machine:* {machine_line(machine_info)}  ")
    made_on = runs_made_on(results, machine_info)
    if made_on:
        lines.append(f"*Runs made on:* {made_on}  ")
    if command:
        lines.append(f"*Command:* `{command}`")
    missing = results.data.get("missing") or []
    if missing:
        lines += ["", f"> **Partial:** {len(results.runs)} of {len(results.runs) + len(missing)} "
                  f"runs finished at scale `{results.scale}`; the claims below use those only. "
                  f"Not finished yet: {', '.join(missing)}."]
    lines += ["", f"{sub} Claims", "", claims_table(verdicts), ""]
    if results.scale == "tiny":
        lines += ["> Scale `tiny` is a smoke test of the pipeline: its numbers say nothing "
                  "about the thesis.", ""]
    for table in exp.tables:
        lines += [f"{sub} {table.title}", "", _partial(results, table.render,
                                                       "*(waiting for unfinished runs)*"), ""]
    if results.runs:
        lines += [f"{sub} Runs", "", runs_table(results), ""]
        lines += ["*test acc. (center)* is the thesis' \"validation accuracy\" (the center on "
                  "the 10,000 test images); *train acc. (center)* evaluates the center on every "
                  "training image used; *last-batch train acc.* is the thesis' \"training "
                  "accuracy\": the mean over workers of each worker's last mini-batch accuracy. "
                  "*virtual s* are seconds of the simulator's clock (compute only unless the "
                  "run has a cost model); *wall s* is the host's time to simulate the run.", ""]
        stale = [label for label, run in results.runs.items() if run.stale]
        if stale:
            lines += [f"> **Stale:** {', '.join(stale)} were made by code whose result-"
                      "affecting source differs from this code's (see "
                      "`distgrad.reproduce.provenance`); rerun without `--reuse-stale`. "
                      "`distgrad reproduce --replay-stale` checks them without retraining: "
                      "it replays their first epochs at this code and compares the events "
                      "(`distgrad.reproduce.replay`).", ""]
    if figures:
        lines += [f"{sub} Figures", ""]
        for file, caption in figures:
            lines += [f"![{caption}]({file})", "", f"*{caption}*", ""]
    if exp.notes:
        lines += [f"{sub} Notes", ""]
        lines += [f"- {note}" for note in exp.notes]
        lines.append("")
    if commands:
        lines += [f"{sub} Each run by hand", "", "```"]
        lines += [f"# {label}\n{cmd}" for label, cmd in commands]
        lines += ["```", ""]
    return "\n".join(lines)


def write_report(results: Results, out: Path, *, command: str | None = None,
                 machine_info: dict[str, Any] | None = None,
                 commands: list[tuple[str, str]] | None = None
                 ) -> tuple[Path, list[tuple[Claim, Verdict]], list[tuple[str, str]]]:
    """Draw the figures into ``out`` and write ``out/report.md``; return (path, verdicts,
    figures)."""
    out.mkdir(parents=True, exist_ok=True)
    verdicts = evaluate_claims(results)
    figures = []
    no_runs = results.experiment.execute is None and not results.runs
    for fig in () if no_runs else results.experiment.figures:
        if _partial(results, lambda r, fig=fig: fig.draw(r, out / fig.file) or "drawn",
                    None) is not None:
            figures.append((fig.file, fig.caption))
    text = render(results, verdicts, figures, command=command, machine_info=machine_info,
                  commands=commands)
    path = out / "report.md"
    path.write_text(text)
    return path, verdicts, figures
