"""Examples that use distgrad from the outside, as a researcher's own code would.

Run from the repository root (so that ``examples`` is importable), e.g.
``python -m distgrad train --algorithm examples.custom_rule:ALGORITHM``.
"""
