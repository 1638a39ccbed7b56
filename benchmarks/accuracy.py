"""Accuracy of every implementation, per dtype, input regime and variant, against the float64 loop.

Variants: "plain" (B/C of shape (b, n, l), no initial_state) and "grouped+initial_state" (B/C in
GROUPS groups, g > 1, several channels per group, and an initial_state): the second is where a
kernel that splits channels over groups the wrong way, or drops the initial state, goes wrong, so a
kernel the suite fails is never "within policy" here. An implementation that declares it lacks one
of the two gets the other alone in that variant, and a "skipped" record naming the gap; one that
lacks both gets only the "skipped" record. Every dtype it declares is measured.

Each point records the largest error of y and of last_state, the float64 oracle's scale, the
error of the loop itself in the same dtype, and whether the tolerance policy
(equivalence/tolerance.py) holds: the numbers behind the report's accuracy table.
"""

import impls
from equivalence.selective import DTYPES, REGIMES, Case, make_inputs
from equivalence.properties import max_finite
from equivalence.selective import oracle, scales
from equivalence.tolerance import compare, terms

SIZES = {"quick": dict(b=1, d=16, n=8, l=256), "default": dict(b=2, d=32, n=16, l=1024),
         "long": dict(b=2, d=64, n=16, l=8192)}
SIZE_REGIMES = {"quick": ("mamba", "stress"), "default": REGIMES, "long": REGIMES}
GROUPS = 4


def _groups(d):
    """The largest of GROUPS, 2 that divides d with at least two channels per group (0: none)."""
    return next((g for g in (GROUPS, 2) if d % g == 0 and d // g >= 2), 0)


def points(size, names):
    out = []
    for name in names or impls.names():
        s = impls.get(name).supports
        shape = SIZES[size]
        if s["case_limits"]:  # interpreted kernels get their own small shape
            shape = {k: min(v, s["case_limits"].get(k, v)) for k, v in shape.items()}
        g = _groups(shape["d"]) if s["grouped"] else 0
        gaps = [gap for gap, ok in (("grouped B/C", s["grouped"] and g), ("initial_state", s["initial_state"])) if not ok]
        variants = [("plain", 0, False)]
        if len(gaps) < 2:
            variants.append(("grouped+initial_state", g, bool(s["initial_state"])))
        if gaps:
            out.append(dict(kind="skipped", impl=name, variant="grouped+initial_state",
                            reason=f"declared gap: {' and '.join(gaps)} (measured without it)" if len(gaps) < 2
                            else f"declared gaps: {' and '.join(gaps)}"))
        for dtype in DTYPES:
            if DTYPES[dtype] in s["dtypes"]:
                out += [dict(impl=name, dtype=dtype, regime=r, variant=v, g=gv, initial_state=init, **shape)
                        for v, gv, init in variants for r in SIZE_REGIMES[size]]
    return out


def measure(point):
    if point.get("kind") == "skipped":
        return dict(skipped=point["reason"])
    case = Case(b=point["b"], d=point["d"], n=point["n"], l=point["l"], g=point["g"], dtype=point["dtype"],
                regime=point["regime"], initial_state=point["initial_state"], seed=1234)
    y, state = impls.selective_scan(**make_inputs(case), return_last_state=True, impl=point["impl"])
    ref, same = oracle(case)
    sy, ss = (max_finite(s) for s in scales(case)[:2])   # the largest sums of |terms| of y and the state
    cy = compare(y, ref[0], same[0], terms("y", case.l, case.n), scale=sy)
    cs = compare(state, ref[1], same[1], terms("last_state", case.l, case.n), scale=ss)
    scale = float(ref[0].abs().max())
    return dict(y_error=cy.error, y_loop_error=cy.loop_error, y_bound=cy.bound, y_scale=scale,
                state_error=cs.error, state_loop_error=cs.loop_error, state_bound=cs.bound,
                within_policy=bool(cy.ok and cs.ok), case=case.id)
