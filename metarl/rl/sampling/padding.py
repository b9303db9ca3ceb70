"""Batch sizes padded to whole CPU vectors, so a task's numbers do not depend on its batch.

ATen's elementwise loops run over two AVX-512 vectors at a time and finish with a scalar tail
whose rounding can differ; a per-task block whose size is a whole number of ``PAD`` floats never
reaches that tail, so every task's numbers come out the same whatever else shares the call.
"""

from __future__ import annotations

import math

PAD = 32  # floats in two AVX-512 vectors (ATen's vectorized loops step by two vectors)


def padded(e: int, widths, *, rows: int = 1) -> int:
    """Smallest ``E' >= e``, a multiple of ``rows``, with ``E' * w`` a multiple of PAD for every width ``w``."""
    step = rows
    for w in widths:
        need = PAD // math.gcd(PAD, int(w))
        step = step * need // math.gcd(step, need)
    return -(-e // step) * step
