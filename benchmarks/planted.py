"""A planted slowdown, for measuring whether the regression gate catches one. Never on by default.

    SCANBENCH_PLANT=parallel=2 scanbench sweep --quick --out slow.jsonl     # parallel's work done twice
    SCANBENCH_PLANT=parallel=1.3 scanbench sweep --quick --out slow.jsonl   # and 30 % more

With SCANBENCH_PLANT=NAME=FACTOR in the environment, the sweeping process replaces the scan of the
registered implementation NAME by one that does its real work FACTOR times: the whole scan
floor(FACTOR) times, then the scan of the first (FACTOR - floor(FACTOR)) of the sequence (a scan's
work grows linearly with its length). The result is the first call's, so nothing else changes. The
variable is part of every point's settings (benchmarks/runner.py), so planted results are never
reused as real ones.
"""

import math
import os

import impls

ENV = "SCANBENCH_PLANT"


def parse(text):
    """"NAME=FACTOR" -> (name, factor), factor >= 1."""
    name, sep, factor = text.rpartition("=")
    try:
        value = float(factor)
    except ValueError:
        value = None
    if not sep or not name or value is None or not value >= 1:
        raise ValueError(f"{ENV}={text!r}: expected NAME=FACTOR with FACTOR >= 1, e.g. parallel=2")
    return name, value


def slowed(scan, factor):
    """scan, doing its work ``factor`` times (see the module docstring)."""
    whole, part = int(math.floor(factor)), factor - math.floor(factor)

    def slow(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, initial_state=None,
             return_last_state=False):
        args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, return_last_state)
        out = scan(*args)
        for _ in range(whole - 1):
            scan(*args)
        k = round(part * u.shape[-1])
        if k:
            cut = [a[..., :k] if hasattr(a, "dim") and a.dim() >= 3 and a.shape[-1] == u.shape[-1] else a
                   for a in args[:7]]
            scan(*cut, delta_bias, delta_softplus, initial_state, return_last_state)
        return out
    return slow


def apply_from_env():
    """Plant the slowdown named in the environment (if any); returns the setting or None."""
    text = os.environ.get(ENV)
    if not text:
        return None
    name, factor = parse(text)
    entry = impls.get(name)
    if not getattr(entry.scan, "planted", False):
        slow = slowed(entry.scan, factor)
        slow.planted = True
        object.__setattr__(entry, "scan", slow)  # the registry's entry is frozen: this plant is the one exception
    return text
