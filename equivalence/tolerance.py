"""The tolerance policy: one rule, used by every test and by the regression check.

An implementation's result is compared with the float64 oracle (the loop run in float64 on the
same, already rounded, inputs). Its error may be at most

    FACTOR x (the error the loop itself makes in the same dtype on the same inputs)
    + eps(compute dtype) x max over elements of (length + conditioning_i) x scale_i

where the error is the largest absolute difference over the tensor, length is the number of
rounded terms accumulated into each element (``terms``: l + n for y, whose readout sums n products
of a state built over l steps; l for states), scale_i is element i's sum of |terms| (below: never
less than |oracle_i|), conditioning_i is how many ulps one rounding inside element i's computation
can grow to on its way there (below), and the compute dtype is float32 for half and float32
results, float64 for float64 ones.

Why this shape: the loop in the same dtype is the honest measure of what that dtype can do on
these inputs (bfloat16 rounding, float32 under strong decay), so a fixed rtol is either too loose
for float32 or too tight for bfloat16. FACTOR = 2 leaves room for a different but equally sound
order of operations (a result rounded to the other neighbour costs up to one ulp where the loop
paid half). The floor covers what the loop's own error cannot: in float64 the loop *is* the oracle
and its error is zero, and in float32 it can be zero by luck (l = 1). There a sound result may
still differ by rounding that grows linearly with the number of terms, and by rounding that the
computation amplifies (the conditioning). With the floor, a 2 % error in a bfloat16 result fails
(the loop's bfloat16 error is at most half an ulp, 0.4 %).

Sums under cancellation. max|oracle| is the right scale only where no element is a sum of terms
much larger than itself. Many are: y_t = <C_t, h_t> can be 0.002 from products of size 2;
dL/ddelta_t sums, over n, a decay term and an input term of opposite signs; dL/ddelta_bias and
dL/dA sum over batch and time, dL/dC over channels. Each term rounded to its nearest float then
moves the sum by up to eps x sum|terms| (the classic bound for a rounded sum), in any order of
summation. So the checks pass ``scale``: each element's sum of |terms|, from the scan's recursion
run in float64 with every term made non-negative, and its adjoint for the gradients
(each family's ``magnitudes``, equivalence/selective/ and equivalence/ssd/; tested never to fall below |oracle|).
Measured on mamba.py's pscan, which reads out y with a BLAS matmul: float64 y 38 ulps of max|y|
off at l = 1 (n = 5, cancelling); a float32 dL/ddelta_bias 10x the loop's error with every
dL/ddelta within one ulp.

Conditioning: the amplification a first-order error analysis gives (``conditioning``). A rounding
is a relative error of eps/2 in one intermediate value; what it does to the result is that
error times the condition number of the rest of the computation. Three places amplify:
- exp(dt A): a relative error r in its argument x = dt A becomes a relative error |x| r in the
  decay. dt A is formed by one product (one rounding), and dt carries the error of the dt
  pipeline (``dt_ulps``), so one step's decay carries |dt A| (dt_ulps + 1) + TRANSCENDENTAL_ULPS
  ulps (exp itself: within an ulp or two in any sound libm; a kernel may use exp2 with a rounded
  log2(e) factor, another |x| ulp, counted by the factor 2 below).
- A window's decay, prod_{s<r<=t} exp(dt_r A) = exp(sum dt_r A), is formed either as a product
  (the loop: its ulps add up) or as exp of a difference of cumulative sums (chunked kernels:
  the sums' roundings are relative to the sum from the chunk's start, not the window's). Both are
  bounded by the sum over the sequence so far of each step's ulps, counted twice (the two
  cumulative sums of a difference). For element t: 2 x sum_{r<=t} step ulps.
- The dt pipeline: softplus(raw) with raw = delta + delta_bias rounded once. d log softplus / d
  log raw = raw sigmoid(raw) / softplus(raw), which is |raw| for a very negative raw: raw = -30
  rounded by half an ulp moves dt by 30 ulps. Without a bias raw is an input, exact.
- The gate silu(z) = z sigmoid(z): an exp, a sum and a quotient, GATE_ULPS (z is exact).
A gradient element sums over the whole sequence through the adjoint, which runs the decays
backwards: its conditioning is the whole sequence's (the forward prefix and the backward suffix),
plus the derivatives of softplus and silu (a sigmoid each).
Derived on closed forms (equivalence/test_tolerance.py): one step, exp(dt A) with dt rounded,
passes at |dt A| = 34 and a 4x larger error fails; a cumulative-sum decay exp(cs_t - cs_s) in
float32 passes where the old floor failed.

A language model's logits: the scan's outputs then pass through projections and norms, the same
code in the loop's run and the kernel's, and a norm over a head's few outputs divides their
rounding by their rms, which is small where the outputs cancel. The loop's error at the logits is
one draw of what those roundings become, and another sound order of operations makes another: at
headdim 1 one was 4x the loop's. So the model checks also pass ``spread``, the logits' largest move
when each scan output moves by one rounding of its sum of |terms| (equivalence/model_helpers.py:
rounding_spread), and the bound takes FACTOR x the larger of it and the loop's error.

Non-finite values: where the loop (or, without a loop run, the oracle cast to the result's
dtype) is NaN or inf, the result must be the same kind of non-finite value; everywhere else it
must be finite. NaN is never allowed to vanish and never allowed to appear.
"""

import dataclasses
import os
import sys

import torch
import torch.nn.functional as F
from hypothesis import target
from hypothesis.control import current_build_context, currently_in_test_context

FACTOR = 2.0
TRANSCENDENTAL_ULPS = 2   # one exp, log1p or sigmoid, evaluated by any sound method
GATE_ULPS = 3             # silu(z) = z / (1 + exp(-z)): an exp, a sum and a quotient


def dt_ulps(raw, softplus, biased):
    """Relative error of dt, in eps, elementwise: raw (any shape) = delta + delta_bias (float64)."""
    if not softplus:
        return torch.full_like(raw, 1.0 if biased else 0.0)
    # torch's softplus is the identity above 20, as every kernel here: its condition number is 1 there
    cond = torch.where(raw > 20, torch.ones_like(raw), (raw * torch.sigmoid(raw) / F.softplus(raw)).abs())
    return (cond if biased else torch.zeros_like(raw)) + TRANSCENDENTAL_ULPS


def conditioning(dtA, dt_rel, time_dim):
    """Ulps a rounding can grow to by step t, for every step: 2 x sum_{r<=t} of each step decay's
    ulps (see the module docstring), plus the worst dt pipeline so far (the input term dt B u
    carries dt's error). dtA: dt A broadcast to the state's shape with a time axis; dt_rel: dt_ulps,
    broadcastable to dtA. Returns dtA's shape; NaN or inf where dtA is not finite."""
    step = dtA.abs() * (dt_rel + 1) + TRANSCENDENTAL_ULPS
    return 2 * step.cumsum(time_dim) + torch.broadcast_to(dt_rel, dtA.shape).cummax(time_dim).values


def gradient_conditioning(last, gated):
    """One number for every gradient element: the largest finite conditioning at the sequence's end
    (last: conditioning()'s last step; the adjoint runs the decays over the whole sequence), plus
    the sigmoids in softplus' and silu's derivatives and, with a gate (gated), its ulps."""
    finite = last[torch.isfinite(last)]
    return (float(finite.max()) if finite.numel() else 0.0) + 2 * TRANSCENDENTAL_ULPS + (GATE_ULPS if gated else 0)


def terms(output, l, n):
    """Rounded terms accumulated into one element of ``output`` ("y" or "last_state"): the state
    after l steps has l; y_t adds the n-term readout <C_t, h_t> on top. A readout summed in another
    order than the loop's differs by rounding in proportion to n, even at l = 1."""
    return l + n if output == "y" else l


def polynomial_magnitudes(loop, x, weights=None):
    """Sums of |terms| for a scan whose outputs are sums of products of its inputs (no exp, no
    division): ``loop`` run on |x| in float64, where each product's magnitude is the product of its
    factors' and no term can cancel another. With weights (w_y, w_state), also {argument: the
    gradient of sum(|w_y| y) + sum(|w_state| state) through that run}, which is by the same argument
    the sum of |summands| of that argument's gradient. A family with a transcendental step (an exp
    of dt A) writes its own: there |x| changes the decays themselves.
    loop(**x) -> (y, state); x: {argument: float64 tensor or None}. Returns (y, state, dict or None)."""
    leaves = {k: v.abs().requires_grad_() for k, v in x.items() if isinstance(v, torch.Tensor)}
    y, state = loop(**{**x, **leaves})
    grads = weights and torch.autograd.grad((y * weights[0].abs()).sum() + (state * weights[1].abs()).sum(),
                                            list(leaves.values()))
    return y.detach(), state.detach(), grads and {k: g.abs() for k, g in zip(leaves, grads)}


@dataclasses.dataclass
class Comparison:
    error: float        # max |actual - oracle| over finite positions
    loop_error: float   # the same for the loop in the actual's dtype (0 when float64)
    bound: float        # what the policy allows
    nonfinite_mismatch: int  # positions whose finiteness differs from the loop's
    worst_index: tuple
    spread: float = 0.0  # the estimated error of a sound order of operations (compare's spread)

    @property
    def ok(self):
        return self.nonfinite_mismatch == 0 and self.error <= self.bound

    @property
    def _sample(self):
        return (f"loop error {self.loop_error:.3g}" if self.loop_error >= self.spread
                else f"rounding spread {self.spread:.3g} (loop error {self.loop_error:.3g})")

    def describe(self):
        return (f"error {self.error:.3g} vs bound {self.bound:.3g} "
                f"(= {FACTOR} x {self._sample} + floor, conditioning included), worst at {self.worst_index}, "
                f"non-finite mismatches: {self.nonfinite_mismatch}")


def _kind(x):
    """0 finite, 1 NaN, 2 +inf, 3 -inf."""
    return torch.isnan(x) * 1 + (x == float("inf")) * 2 + (x == float("-inf")) * 3


def compare(actual, oracle, loop=None, length=1, scale=None, exact_kinds=True, conditioning=0.0, spread=0.0):
    """Apply the policy. actual: any shape and floating dtype; oracle: float64, same shape;
    loop: the loop's result in actual's dtype (None means actual is float64 and the oracle is its loop);
    scale: what the floor is relative to, when not |oracle|: each element's sum of |summands|
    (a tensor of actual's shape) or the largest of them (a number);
    conditioning: ulps a rounding can grow to, a number or a tensor of actual's shape (the floor
    is eps x max over elements of (length + conditioning) x scale);
    exact_kinds=False: only finite against non-finite is compared, not which non-finite value. Only
    for an infinite decay (dt = -inf, so exp(dt A) = inf): products and sums of infinities of both
    signs are inf or NaN depending on the order they are formed in (inf * (inf - inf) against
    inf * inf - inf * inf), and no order is the spec's.
    spread: the error that another sound order of operations is estimated to make (a number; a
    language model's logits: equivalence/model_helpers.rounding_spread). The loop's error is one
    draw of that error, and where the computation after the scan amplifies a few roundings (a norm
    dividing by a small rms) one draw can be far smaller than the next: FACTOR x the larger of the two."""
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
    scale = o.abs() if scale is None else torch.as_tensor(scale, dtype=torch.float64).cpu()
    conditioning = torch.as_tensor(conditioning, dtype=torch.float64).cpu()
    # past an infinite or NaN step the conditioning is not finite, and so is the oracle there
    conditioning = torch.where(torch.isfinite(conditioning), conditioning, torch.zeros((), dtype=torch.float64))
    weighted = (max(length, 1) + conditioning) * scale
    weighted = weighted[torch.isfinite(weighted)]
    eps = torch.finfo(torch.float64 if actual.dtype == torch.float64 else torch.float32).eps
    bound = FACTOR * max(loop_error, spread) + eps * (float(weighted.max()) if weighted.numel() else 0.0)
    return Comparison(error, loop_error, bound, mismatch, worst, spread)


_targeted = [None, set()]  # (the hypothesis test case, the labels it has reported)


def report_margin(what, c):
    """Inside a hypothesis test, report error / bound as a target (labelled by what was compared:
    "y", "grad A"), so that the search climbs towards the bound instead of drawing blindly; the
    false-alarm run (equivalence/false_alarms.py) reads the largest back. A label counts once per
    test case (hypothesis' rule): its first comparison."""
    if not currently_in_test_context():
        return
    context = current_build_context()
    if _targeted[0] is not context:
        _targeted[:] = [context, set()]
    label = what.rsplit(": ", 1)[-1]
    if label in _targeted[1]:
        return
    _targeted[1].add(label)
    ratio = c.error / c.bound if c.bound > 0 else (0.0 if c.error == 0 else 1e6)
    target(min(ratio + c.nonfinite_mismatch, 1e6), label=label)


_announced = set()


def announce(text):
    """Where a first failure is told at once: stderr here; under pytest the plugin replaces this with
    a write past pytest's output capture, which would otherwise hold it until the test ends."""
    print(text, file=sys.stderr, flush=True)


def _announce_first_failure(what, c, repro):
    """Print a test's first failing comparison at once, before hypothesis shrinks it (which can take
    a minute): the unshrunk case is already enough to start on."""
    test = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0]
    if not test or test in _announced:
        return
    _announced.add(test)
    announce(f"\n{test}: first failure, unshrunk (shrinking follows): {what}: {c.describe()}\n  reproduce: {repro}")


def assert_close(what, actual, oracle, loop=None, length=1, repro="", scale=None, exact_kinds=True,
                 conditioning=0.0):
    """compare() and raise AssertionError with a reproducing snippet if the policy is not met."""
    c = compare(actual, oracle, loop, length, scale, exact_kinds, conditioning)
    report_margin(what, c)
    if not c.ok:
        _announce_first_failure(what, c, repro)
        raise AssertionError(f"{what}: {c.describe()}\n  reproduce: {repro}")
    return c


# ---- Mamba-2 SSD: the same policy, with the SSD's shapes --------------------------------
# An element of out is h_t C_t (n products, a state built over l tokens) plus D x_t; a final state is
# built over l tokens. A chunked implementation adds its terms in another order (a sum over the
# tokens of a chunk, and C_i . B_j over n before the decay), but no element accumulates more
# rounded terms than the loop's, so the count stays l + n for out and l for states; what changes
# with the SSD is the scale, the sums of |terms| (equivalence/ssd/__init__.py: magnitudes).


def ssd_terms(output, l, n):
    """Rounded terms accumulated into one element of ``output`` ("out" or "final_states")."""
    if output not in ("out", "final_states"):
        raise ValueError(f"ssd_terms: output must be 'out' or 'final_states', got {output!r}")
    return terms("y" if output == "out" else "last_state", l, n)
