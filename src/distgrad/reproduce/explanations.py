"""Hand-written explanations the results page shows beside a claim that does not hold.

The page's discussion is generated from the verdicts (:func:`distgrad.reproduce.page.
discussion`): which claims hold, which do not and with what numbers. What it cannot compute
is *why*; these notes say it, keyed by claim id, and the page marks them hand-written. They
carry no numbers of their own (every number on the page comes from a verdict), so a rerun
cannot leave them out of date in figures — only in reasoning, which is why they are marked.
"""

from __future__ import annotations

WHY: dict[str, str] = {
    "1b": "with the thesis' Adam inner steps, one commit per step and a seeded random commit "
          "order our DOWNPOUR at n = 20 trains. The thesis' collapse came from its own "
          "cluster, whose timing we cannot replay (experiment `timing-order` tests one "
          "difference, lockstep against random order, for AGN). Reported as not "
          "reproduced, not as refuted.",
    "1b-exp": "as 1b: memoryless step times (geometric staleness) do not make DOWNPOUR "
              "collapse at n = 20 either.",
    "3": "DynSGD's windowed accuracy falls, but by less than the threshold, and AGN at the "
         "same λ can fall as much: not the clean contrast the thesis draws, at this scale.",
    "E4-train": "an end-of-training comparison: at `quick` the runs stop at the start of "
                "training. The thesis' metric, the workers' last mini-batch accuracy, moves "
                "in steps of 1/128 per worker; each row shows the center's accuracy too.",
    "E4-aeasgd": "measured on the center, AEASGD's validation accuracy is compared with an "
                 "honest training accuracy in the same row; the claim fails against the "
                 "last-mini-batch \"training accuracy\", which measures the workers.",
    "4a": "an end-of-training comparison (see E4-train); the row shows both metrics.",
    "4b": "an end-of-training comparison of validation accuracies (see E4-train): after a "
          "few epochs AEASGD's center is ahead in most cells with small n; by the thesis' 40 "
          "epochs AGN's ends higher in them; the thesis' ordering is not reproduced there.",
    "4c": "an end-of-training comparison of validation accuracies (see E4-train): by the "
          "thesis' 40 epochs AGN's center ends higher than AEASGD's in the cells with "
          "n ≥ 20 except at λ=10, where AGN with many workers committing often is unstable "
          "(its n=30 run is E7's); after a few epochs the cells are split.",
    "4d": "temporal efficiency compares whole training curves; at `quick` the curves are "
          "the first epochs only.",
    "4e": "follows 4d: where E < 1 depends on the curves' ends.",
    "5b": "fails against the workers' last mini-batch accuracy; the row shows the count "
          "against the center's training accuracy as well.",
    "7-n30": "the mean is near n − 1 but the lognormal start offsets spread the first "
             "commits and move the mode; the thesis' histogram for n = 30 has no legible "
             "mode.",
    "8a": "ADAG damps AGN's early loss spikes but does not remove them in the longer run: "
          "its largest rise is a fraction of AGN's, yet above our spike threshold (the "
          "thesis gives no threshold; its figure shows spikes of AGN's size).",
    "9c": "on the Beale function the early-commit condition ‖∇L‖ − ρ‖θ^k − θ̃‖ < 1 fires "
          "whenever the noisy gradient is small, whatever λ is; the thesis shows one run "
          "and does not state its step size.",
    "M2": "the simulator's default near-constant staleness (lognormal, σ = 0.25) is a delay, "
          "not the geometric staleness of the queueing model behind 1 − 1/n; M1 shows the "
          "formula with memoryless workers.",
    "E4-time": "with this machine's shared-memory costs the server is busy a small fraction "
               "of the time, so commit frequency moves wall time little; the thesis' "
               "dist-keras pickled weights over TCP, which makes each commit far costlier "
               "(see E4-time-dk).",
    "E4-time-dk": "the modelled dist-keras costs leave out Spark's own overheads and the "
                  "thesis' network; the thesis' DynSGD time also includes its collapses and "
                  "recoveries, which a schedule-only model cannot show.",
    "6": "with this machine's per-commit costs the server does not saturate up to n = 40, so "
         "time keeps falling ∝ 1/n; the thesis saw no speed-up beyond n ≈ 30 and blamed "
         "its thread-based server.",
    "6-dk": "with the modelled dist-keras costs the one-lock server saturates as n grows: "
            "beyond that point more workers only queue.",
    "E4-collapse": "at `full` a fall counts only after the thesis' threshold is first passed "
                   "(at `quick` a lower one); once there, our DynSGD trains steadily. A "
                   "guess, not tested here: the simulator's near-constant staleness gives its "
                   "staleness-scaled steps little variance, and the thesis' collapses came "
                   "from staleness spikes on its cluster.",
    "T1": "with the same mean staleness the two orders train alike: late in training their "
          "mean accuracies differ by less than a point, less than the spread of single "
          "evaluations, so a comparison of single final evaluations can show a gap "
          "either way (the row gives them too). The README's earlier probe, whose script was "
          "not kept, is not reproduced.",
}
"""Claim id -> why it does not hold (or is not tested). Empty: nothing to add."""
