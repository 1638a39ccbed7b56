"""The tolerance policy: one rule, used by every test and by the regression check.

An implementation's result is compared with the float64 oracle (the loop run in float64 on the
same, already rounded, inputs). Its error may be at most

    FACTOR x (the error the loop itself makes in the same dtype on the same inputs)
    + eps(compute dtype) x length x scale

with scale = max|oracle|, or the largest sum of |terms| where an element is a sum that cancels
(below),

where the error is the largest absolute difference over the tensor, length is the number of
rounded terms accumulated into each element (``terms``: l + n for y, whose readout sums n products
of a state built over l steps; l for states), and the compute dtype is float32 for half and float32
results, float64 for float64 ones.

Why this shape: the loop in the same dtype is the honest measure of what that dtype can do on
these inputs (bfloat16 rounding, float32 under strong decay), so a fixed rtol is either too loose
for float32 or too tight for bfloat16. FACTOR = 2 leaves room for a different but equally sound
order of operations (a result rounded to the other neighbour costs up to one ulp where the loop
paid half). The floor covers float64, where the loop *is* the oracle and its own error is zero:
a float64 result may differ by rounding that grows at most linearly with the number of terms,
which is still ~1e-13 relative at l = 1000. With it, a 2 % error in a bfloat16 result fails
(the loop's bfloat16 error is at most half an ulp, 0.4 %).

Sums under cancellation. max|oracle| is the right scale for the floor only where no element is a
sum of terms much larger than itself. Many are: y_t = <C_t, h_t> can be 0.002 from products of size
2; dL/ddelta_t sums, over n, a decay term and an input term of opposite signs; dL/ddelta_bias and
dL/dA sum over batch and time, dL/dC over channels. Each term rounded to its nearest float then
moves the sum by up to eps x sum|terms| (the classic bound for a rounded sum), and in float64,
where the loop's own error is zero, any order of summation but the loop's exceeds a floor relative
to |sum|. So the checks pass ``scale``: the largest sum of |terms| of an element, from the scan's
recursion run in float64 with every term made non-negative, and its adjoint for the gradients
(equivalence/checks.py: ``magnitudes``; tested never to fall below |oracle|, for the outputs and
every gradient). Measured on mamba.py's pscan, which reads out y with a BLAS matmul: float64 y 38
ulps of max|y| off at l = 1 (n = 5, cancelling); a float32 dL/ddelta_bias 10x the loop's error with
every dL/ddelta within one ulp; float64 dL/dA and dL/ddelta likewise. Our own `parallel` had a
float32 dL/ddelta (l = 1, n = 1, from an initial state) 1.2x over the old bound: the same
cancellation, found by the thorough profile.

Non-finite values: where the loop (or, without a loop run, the oracle cast to the result's
dtype) is NaN or inf, the result must be the same kind of non-finite value; everywhere else it
must be finite. NaN is never allowed to vanish and never allowed to appear.
"""

import dataclasses

import torch

FACTOR = 2.0


def terms(output, l, n):
    """Rounded terms accumulated into one element of ``output`` ("y" or "last_state"): the state
    after l steps has l; y_t adds the n-term readout <C_t, h_t> on top. A readout summed in another
    order than the loop's differs by rounding in proportion to n, even at l = 1."""
    return l + n if output == "y" else l


@dataclasses.dataclass
class Comparison:
    error: float        # max |actual - oracle| over finite positions
    loop_error: float   # the same for the loop in the actual's dtype (0 when float64)
    bound: float        # what the policy allows
    nonfinite_mismatch: int  # positions whose finiteness differs from the loop's
    worst_index: tuple

    @property
    def ok(self):
        return self.nonfinite_mismatch == 0 and self.error <= self.bound

    def describe(self):
        return (f"error {self.error:.3g} vs bound {self.bound:.3g} "
                f"(= {FACTOR} x loop error {self.loop_error:.3g} + floor), worst at {self.worst_index}, "
                f"non-finite mismatches: {self.nonfinite_mismatch}")


def _kind(x):
    """0 finite, 1 NaN, 2 +inf, 3 -inf."""
    return torch.isnan(x) * 1 + (x == float("inf")) * 2 + (x == float("-inf")) * 3


def compare(actual, oracle, loop=None, length=1, scale=None, exact_kinds=True):
    """Apply the policy. actual: any shape and floating dtype; oracle: float64, same shape;
    loop: the loop's result in actual's dtype (None means actual is float64 and the oracle is its loop);
    scale: what the floor is relative to, when not max|oracle| (a sum under cancellation: the
    largest sum of |summands| of an element);
    exact_kinds=False: only finite against non-finite is compared, not which non-finite value. Only
    for an infinite decay (dt = -inf, so exp(dt A) = inf): products and sums of infinities of both
    signs are inf or NaN depending on the order they are formed in (inf * (inf - inf) against
    inf * inf - inf * inf), and no order is the spec's."""
    if actual.shape != oracle.shape:
        raise AssertionError(f"shape {tuple(actual.shape)} differs from the oracle's {tuple(oracle.shape)}")
    a, o = actual.detach().double().cpu(), oracle.detach().double().cpu()
    expected_kind = _kind(loop.detach().double().cpu()) if loop is not None else _kind(oracle.detach().to(actual.dtype).double().cpu())
    kind = _kind(a)
    if not exact_kinds:
        expected_kind, kind = (expected_kind > 0) * 1, (kind > 0) * 1
    mismatch = int((kind != expected_kind).sum())
    finite = (expected_kind == 0) & (kind == 0) & torch.isfinite(o)
    diff = torch.where(finite, (a - o).abs(), torch.zeros_like(a))
    error = float(diff.max()) if diff.numel() else 0.0
    worst = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape)) if diff.numel() else ()
    loop_error = 0.0
    if loop is not None:
        lp = loop.detach().double().cpu()
        lfin = finite & torch.isfinite(lp)
        loop_error = float(torch.where(lfin, (lp - o).abs(), torch.zeros_like(lp)).max()) if lp.numel() else 0.0
    if scale is None:
        scale = float(torch.where(torch.isfinite(o), o.abs(), torch.zeros_like(o)).max()) if o.numel() else 0.0
    eps = torch.finfo(torch.float64 if actual.dtype == torch.float64 else torch.float32).eps
    bound = FACTOR * loop_error + eps * max(length, 1) * scale
    return Comparison(error, loop_error, bound, mismatch, worst)


def assert_close(what, actual, oracle, loop=None, length=1, repro="", scale=None, exact_kinds=True):
    """compare() and raise AssertionError with a reproducing snippet if the policy is not met."""
    c = compare(actual, oracle, loop, length, scale, exact_kinds)
    if not c.ok:
        raise AssertionError(f"{what}: {c.describe()}\n  reproduce: {repro}")
    return c


# ---- Mamba-2 SSD (issue 15): the same policy, with the SSD's shapes --------------------------------
# An element of out is h_t C_t (n products, a state built over l tokens) plus D x_t; a final state is
# built over l tokens. A chunked implementation adds its terms in another order (a sum over the
# tokens of a chunk, and C_i . B_j over n before the decay), but no element accumulates more
# rounded terms than the loop's, so the count stays l + n for out and l for states; what changes
# with the SSD is the scale, the sums of |terms| (equivalence/ssd_checks.py: magnitudes).


def ssd_terms(output, l, n):
    """Rounded terms accumulated into one element of ``output`` ("out" or "final_states")."""
    if output not in ("out", "final_states"):
        raise ValueError(f"ssd_terms: output must be 'out' or 'final_states', got {output!r}")
    return terms("y" if output == "out" else "last_state", l, n)
