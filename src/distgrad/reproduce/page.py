"""The results page (``docs/reproduction.md``): every experiment's claims, tables and
figures, the machine, the command, and where the thesis' own numbers do not add up."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from distgrad.reproduce import thesis_data as T
from distgrad.reproduce.provenance import machine, machine_line
from distgrad.reproduce.report import HOLDS_MARK, _escape, render, runs_made_on

if TYPE_CHECKING:
    from distgrad.reproduce import Outcome


def thesis_inconsistencies() -> list[str]:
    """Places where the thesis' numbers disagree with each other, recomputed from its tables."""
    gt, ge, cells = T.te_wins()
    share = T.TABLE_3_1_CAPTION_SHARE
    matches = [k for k in range(cells + 1) if abs(100 * k / cells - share) < 0.005]
    tr, total = T.agn_training_wins()
    ae = T.aeasgd_mean_train_by_n()
    agn_max = {n: max(T.TABLE_3_2[(n, lam)]["agn"]["train"] for lam in T.GRID) for n in T.GRID}
    return [
        f"Table 3.1's caption says AGN wins in {share} % of the cases; "
        + (f"k = {matches} of {cells} gives that" if matches else f"no k/{cells} gives that")
        + f": the table has {gt}/{cells} = "
        f"{100 * gt / cells:.2f} % cells with E > 1 and {ge}/{cells} = {100 * ge / cells:.2f} % "
        "with E ≥ 1.",
        f"The example plot labelled E = 1.044 shows n = 30, λ = 20, which Table 3.1 lists as "
        f"{T.TABLE_3_1[(30, 20)]:.3f}; 1.044 is the n = 40, λ = 10 cell.",
        "The thesis' \"training accuracy\" is the mean of the workers' last mini-batch "
        "accuracies over 128 samples (dist-keras `history_executors_average`, which also "
        "skips the highest worker id), so it moves in steps of 1/128 = 0.78 points per "
        "worker: 99.22 % is 127/128. We report it next to an evaluation of the center on "
        "every training image.",
        f"Fig. agn_aeasgd_workers compares AGN's *maximum* over λ ({agn_max[10]:.2f} % at "
        f"n = 10, {agn_max[40]:.2f} % at n = 40) with AEASGD's *mean* over λ ({ae[10]:.2f} %, "
        f"{ae[40]:.2f} %), computed here from Table 3.2.",
        f"AGN beats AEASGD on training accuracy in {tr}/{total} cells of Table 3.2; "
        f"AEASGD's validation ≥ its training accuracy in {T.aeasgd_val_ge_train()[0]}/"
        f"{T.aeasgd_val_ge_train()[1]} runs, which the text calls \"no overfitting\".",
        "Staleness: the text gives E[τ] = n − 1, chapter 4 reads the mean staleness at "
        "n = 20 as ≈20 = n.",
        "DynSGD: the equation divides by τ, the algorithm and the code by τ + 1 (we use "
        "τ + 1).",
        "ADAG: the equation writes ‖θ̃_t − θ̃_{t−τ}‖², the text calls the factor per-weight "
        "and the code squares element-wise (we square element-wise); in the discussion's "
        "arithmetic \"0.034²\" should read 0.038² = 0.001444.",
        "Table numbering: 3.1 is the temporal-efficiency table and 3.2 the summary, in "
        "source order; the experiment script's docstring calls the summary \"Table 3.1\".",
    ]


def _key(o: Outcome, claim_id: str) -> tuple[str, str]:
    return (o.experiment.name, claim_id)


def caveat(o: Outcome) -> str:
    """What a reader must know about where ``o``'s verdicts come from: runs made by code
    that has changed since (stale) and runs not finished yet; "" when neither."""
    notes = _caveats(o)
    return f" ({'; '.join(notes)})" if notes else ""


def _caveats(o: Outcome) -> list[str]:
    runs, missing = o.results.runs, o.results.data.get("missing") or []
    stale = [r for r in runs.values() if r.stale]
    replayed = [r.replayed for r in stale if r.replayed]
    notes = []
    if stale:
        note = f"{len(stale)} of {len(runs)} runs stale"
        if replayed:
            span = (f"{min(replayed)}" if min(replayed) == max(replayed)
                    else f"{min(replayed)}–{max(replayed)}")
            note += (f", {len(replayed)} of them replayed identically by this code for their "
                     f"first {span} epoch(s)")
        notes.append(note)
    if missing:
        notes.append(f"{len(runs)} of {len(runs) + len(missing)} runs finished")
    return notes


def discussion(outcomes: list[Outcome], compare: list[Outcome] | None = None) -> list[str]:
    """The page's discussion, generated from the verdicts: what holds, what does not (with
    our numbers and the hand-written *why* of :mod:`distgrad.reproduce.explanations`, marked
    as such), what is not tested, and — given ``compare``, the outcomes at another scale —
    which verdicts changed between the scales."""
    from distgrad.reproduce.explanations import WHY

    held = [(o, c, v) for o in outcomes for c, v in o.verdicts if v.holds]
    failed = [(o, c, v) for o in outcomes for c, v in o.verdicts if v.holds is False]
    untested = [(o, c, v) for o in outcomes for c, v in o.verdicts if v.holds is None]
    lines = ["## What we confirm, what we do not, and why", "",
             "*Generated from the verdicts in the table above. Text after \"why "
             "(hand-written)\" comes from `src/distgrad/reproduce/explanations.py`, carries no "
             "numbers of its own and is not recomputed by a rerun.*", ""]
    by_exp: dict[str, list[str]] = {}
    for o, c, _ in held:
        by_exp.setdefault(o.experiment.name, []).append(c.id)
    lines.append(f"**Confirmed ({len(held)}).** " + "; ".join(
        f"`{name}`: {', '.join(ids)}" for name, ids in by_exp.items()) + ".")
    lines += ["", f"**Not confirmed ({len(failed)}).**", ""]
    for o, c, v in failed:
        why = WHY.get(c.id)
        lines.append(f"* **{c.id}** (`{o.experiment.name}`, `{o.results.scale}`): "
                     f"{_escape(c.text)}. Thesis: {c.thesis}. Ours: {v.ours}."
                     + (f" *Why (hand-written): {why}*" if why else ""))
    lines += ["", f"**Not tested ({len(untested)}).**", ""]
    for o, c, v in untested:
        lines.append(f"* **{c.id}** (`{o.experiment.name}`): {v.ours}"
                     + (f" — {v.note}" if v.note else "") + ".")
    if compare:
        other = {_key(o, c.id): (o.results.scale, v, caveat(o))
                 for o in compare for c, v in o.verdicts}
        changed = [(o, c, v, other[_key(o, c.id)]) for o in outcomes for c, v in o.verdicts
                   if _key(o, c.id) in other and other[_key(o, c.id)][1].holds != v.holds]
        lines += ["", "## Verdicts that changed between scales", ""]
        if not changed:
            lines.append("None of the claims tested at both scales changed verdict.")
        for o, c, v, (scale, w, note) in changed:
            why = WHY.get(c.id)
            lines.append(f"* **{c.id}** (`{o.experiment.name}`): {w.label} at `{scale}`{note} "
                         f"({w.ours}) → {v.label} at `{o.results.scale}` ({v.ours})."
                         + (f" *Why (hand-written): {why}*" if why else ""))
        partial = [o for o in compare if o.results.data.get("missing")]
        if partial:
            lines += ["", f"## Unfinished at `{partial[0].results.scale}`", "",
                      "Their verdicts above use the finished runs only.", ""]
        for o in partial:
            done = o.experiment.progress(o.results) if o.experiment.progress else ", ".join(
                o.results.runs)
            lines.append(f"* `{o.experiment.name}`: {'; '.join(_caveats(o))}; {done}.")
    lines.append("")
    return lines


def write_page(outcomes: list[Outcome], page: Path, *, command: str, scale: str,
               discussion_file: Path | None = None,
               compare: list[Outcome] | None = None) -> Path:
    """Write ``page`` and copy every figure into ``<page dir>/reproduction/``.

    ``compare``: the same experiments' outcomes at another scale (from finished runs): the
    claim table gets a column with their verdicts and the discussion lists what changed.
    ``discussion_file``: hand-written markdown, inserted under a heading that says so."""
    page.parent.mkdir(parents=True, exist_ok=True)
    fig_dir = page.parent / "reproduction"
    fig_dir.mkdir(exist_ok=True)
    counts = {True: 0, False: 0, None: 0}
    for o in outcomes:
        for _, v in o.verdicts:
            counts[v.holds] += 1
    m = machine()
    made_on = runs_made_on([o.results for o in outcomes], m)
    minutes = sum(o.results.wall_seconds for o in outcomes) / 60
    lines = [
        "# Reproducing Hermans (2017) with distgrad", "",
        "This page is generated. Every number on it comes from the command below, run on "
        "the machines below; rerun it to check (the simulator is deterministic for a seed). "
        "Each experiment is a declarative configuration in `src/distgrad/reproduce/`; its "
        "claims are the falsifiable ones of the thesis (spec/thesis.md §5) plus the numbers "
        "of its figures and tables.", "",
        "```bash", command, "```", "",
        f"*Scale:* `{scale}`" + (
            " (" + ", ".join(f"`{o.experiment.name}` at `{o.results.scale}`"
                             for o in outcomes if o.results.scale != scale) + ")"
            if any(o.results.scale != scale for o in outcomes) else "")
        + f". *Machine:* {machine_line(m)}. *Compute:* {minutes:.0f} min of wall time in "
        "training and simulation.", "",
        *([f"*Runs made on* (the page was built on the machine above, from their finished "
           f"runs): {made_on}.", ""] if made_on else []),
        f"**Claims: {counts[True]} hold · {counts[False]} do not hold · {counts[None]} not "
        "tested here.**", "",
    ]
    if compare:
        them = [v.holds for o in compare for _, v in o.verdicts]
        lines += [f"**At `{compare[0].results.scale}`** (the column \"other scale\", from its "
                  f"finished runs): {them.count(True)} hold · {them.count(False)} do not hold · "
                  f"{them.count(None)} not tested; {sum(counts.values()) - len(them)} claims "
                  "have no runs at that scale.", ""]
    if scale != "full":
        lines += [f"> `{scale}` runs shorten the thesis' 40 epochs (see each experiment's "
                  "setup) and shrink its grids; a verdict at this scale is about the start of "
                  "training. `distgrad reproduce NAME --scale full` follows the thesis.", ""]
    other = {_key(o, c.id): (o.results.scale, v, caveat(o))
             for o in compare or [] for c, v in o.verdicts}
    extra = " other scale: ours, verdict |" if other else ""
    lines += ["## All claims", "",
              "| experiment | scale | claim | condition | thesis | ours | verdict |" + extra,
              "|---|---|---|---|---|---|---|" + ("---|" if other else "")]
    for o in outcomes:
        for claim, v in o.verdicts:
            row = (f"| [{o.experiment.name}](#{o.experiment.name}) | {o.results.scale} "
                   f"| {claim.id} | "
                   f"{_escape(claim.text)} | {_escape(claim.thesis)} | {_escape(v.ours)} | "
                   f"{HOLDS_MARK[v.holds]} |")
            if other:
                s, w, note = other.get(_key(o, claim.id), (None, None, ""))
                row += (" – |" if w is None
                        else f" `{s}`{note}: {_escape(w.ours)}, {HOLDS_MARK[w.holds]} |")
            lines.append(row)
    lines.append("")
    lines += discussion(outcomes, compare)
    if discussion_file is not None:
        lines += ["## Notes (hand-written)", "",
                  f"*From `{discussion_file.as_posix()}`, written by hand: its numbers are not "
                  "recomputed by a rerun.*", "", discussion_file.read_text().strip(), ""]
    lines += ["## Where the thesis' own numbers do not add up", ""]
    lines += [f"- {item}" for item in thesis_inconsistencies()]
    lines += ["", "## The experiments", ""]
    for o in outcomes:
        figures = []
        for file, caption in o.figures:
            target = fig_dir / f"{o.experiment.name}-{file}"
            shutil.copyfile(o.report.parent / file, target)
            figures.append((f"{fig_dir.name}/{target.name}", caption))
        lines.append(f'<a id="{o.experiment.name}"></a>')
        lines.append("")
        lines.append(render(o.results, o.verdicts, figures, heading="###",
                            command=f"distgrad reproduce {o.experiment.name} --scale "
                                    f"{o.results.scale} --out DIR"))
    page.write_text("\n".join(lines).rstrip() + "\n")
    return page
