"""Accuracy of every implementation, per dtype and input regime, against the float64 loop.

Each point records the largest error of y and of last_state, the float64 oracle's scale, the
error of the loop itself in the same dtype, and whether the tolerance policy
(equivalence/tolerance.py) holds: the numbers behind the report's accuracy table.
"""

import impls
from equivalence.cases import DTYPES, REGIMES, Case, make_inputs
from equivalence.checks import oracle, scales
from equivalence.tolerance import compare, terms

SIZES = {"quick": dict(b=1, d=16, n=8, l=256), "default": dict(b=2, d=32, n=16, l=1024),
         "long": dict(b=2, d=64, n=16, l=8192)}


def points(size, names):
    out = []
    for name in names or impls.names():
        shape = SIZES[size]
        limits = impls.get(name).supports["case_limits"]  # interpreted kernels get their own small shape
        if limits:
            shape = {k: min(v, limits.get(k, v)) for k, v in shape.items()}
        for dtype in DTYPES:
            if DTYPES[dtype] in impls.get(name).supports["dtypes"]:
                out += [dict(impl=name, dtype=dtype, regime=r, **shape) for r in REGIMES]
    return out


def measure(point):
    supports = impls.get(point["impl"]).supports
    case = Case(b=point["b"], d=point["d"], n=point["n"], l=point["l"], g=1 if supports["grouped"] else 0,
                dtype=point["dtype"], regime=point["regime"], initial_state=supports["initial_state"], seed=1234)
    y, state = impls.selective_scan(**make_inputs(case), return_last_state=True, impl=point["impl"])
    ref, same = oracle(case)
    sy, ss = scales(case)
    cy = compare(y, ref[0], same[0], terms("y", case.l, case.n), scale=sy)
    cs = compare(state, ref[1], same[1], terms("last_state", case.l, case.n), scale=ss)
    scale = float(ref[0].abs().max())
    return dict(y_error=cy.error, y_loop_error=cy.loop_error, y_bound=cy.bound, y_scale=scale,
                state_error=cs.error, state_loop_error=cs.loop_error, state_bound=cs.bound,
                within_policy=bool(cy.ok and cs.ok))
