"""Four properties written once for both families, reached through a ``Family``.

    determinism        the same call twice gives the same bits, forward and (where it has gradients)
                       backward (capability ``deterministic``; the official repository checks this
                       for its SSD backward only)
    batch invariance   row i's output does not depend on the batch around it: row i alone, and in
                       its batch grown by b other rows before or after it. Bit for bit
                       where the implementation declares ``batch_invariant``, within the tolerance
                       policy of the float64 loop otherwise
    unwritten memory   the call run again while every fresh torch.empty / empty_like /
                       empty_strided / new_empty allocation is filled with NaN (as
                       flash-linear-attention's conftest does): a NaN that shows up only then comes
                       from memory the implementation never wrote, and its positions are named
    non-finite         a NaN, inf or -inf at token t of any time input changes no output before t,
    causality          bit for bit. The spec is the loop: y_s reads no input after s, so any change
                       of an earlier output, even in its last bit, is information flowing backwards
                       (a masked 0 x NaN, or a guarded path that sums a whole tile in another order)

A ``Family`` carries what these need of one family of scans: its cases' inputs, its public scan
returning (y, last states), its oracle comparison and which arguments have a batch or time axis.
``SELECTIVE`` is Mamba-1 (equivalence/checks.py), ``SSD`` is Mamba-2 (equivalence/ssd_checks.py).
Each check raises AssertionError with a line that reproduces the case, or returns quietly.
"""

import contextlib
import dataclasses
import functools

import torch

import impls

from . import cases as selective_cases
from . import checks, ssd_cases, ssd_checks


@dataclasses.dataclass(frozen=True)
class Family:
    """What the properties need to know about one family of scans.

    make_inputs(case): the scan's keyword arguments (chunk_size excepted)
    scan(name, case, x): (y, last states) of one call through the public function
    prepare(name, case): (registry entry, the case folded into its size limits)
    supported(entry, case): whether the entry declares what the case needs
    oracle(case), assert_matches_oracle(...): the float64 loop and the tolerance policy
    repro(name, case): a line that reproduces the call
    """
    name: str
    time_args: tuple     # arguments with a time axis
    time_dim: int        # the time axis of those arguments and of y
    batch_args: tuple    # arguments with a leading batch axis
    make_inputs: object
    scan: object
    prepare: object
    supported: object
    oracle: object
    assert_matches_oracle: object
    repro: object

    def entry(self, name):
        return impls.get(name, self.name)


def _selective_scan(name, case, x):
    return impls.selective_scan(**x, return_last_state=True, impl=name)


def _ssd_scan(name, case, x):
    return impls.ssd_scan(**x, chunk_size=case.chunk_size, return_final_states=True, impl=name)


SELECTIVE = Family(name="selective", time_args=checks.TIME_ARGS, time_dim=-1, batch_args=checks.BATCH_ARGS,
                   make_inputs=selective_cases.make_inputs, scan=_selective_scan, prepare=checks.prepare,
                   supported=checks.supported, oracle=checks.oracle,
                   assert_matches_oracle=checks.assert_matches_oracle, repro=checks.repro)
SSD = Family(name="ssd", time_args=ssd_cases.TIME_ARGS, time_dim=1, batch_args=ssd_checks.BATCH_ARGS,
             make_inputs=ssd_cases.make_inputs, scan=_ssd_scan, prepare=ssd_checks.prepare,
             supported=ssd_checks.supported, oracle=ssd_checks.oracle,
             assert_matches_oracle=ssd_checks.assert_matches_oracle, repro=ssd_checks.repro)


def same(a, b):
    """Elementwise: bit-for-bit equal values, NaN equal to NaN (and -0 equal to 0)."""
    return (a == b) | (torch.isnan(a) & torch.isnan(b))


def _first(mask, a, b, limit=5):
    """The first positions where ``mask`` holds, with a's and b's values there."""
    return ", ".join(f"{tuple(i)}: {a[tuple(i)].item()!r} vs {b[tuple(i)].item()!r}"
                     for i in mask.nonzero()[:limit].tolist())


# --- determinism ---------------------------------------------------------------------------------

def _forward_backward(family, name, case, x):
    """{what: tensor}: y, last states, and with gradients (float32 and float64 cases, as the
    gradient tests) every floating input's gradient of a fixed random linear function of both."""
    entry = family.entry(name)
    if not (entry.supports["gradients"] and case.dtype in ("f32", "f64")):
        with torch.no_grad():
            y, s = family.scan(name, case, x)
        return {"y": y, "last states": s}
    leaves = {k: (v.detach().requires_grad_() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
              for k, v in x.items()}
    y, s = family.scan(name, case, leaves)
    gen = torch.Generator().manual_seed(case.seed + 3)
    w_y = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    w_s = torch.randn(s.shape, generator=gen, dtype=torch.float64)
    loss = (y.double() * w_y).sum() + (s.double() * w_s).sum()
    wrt = [k for k, v in leaves.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    grads = torch.autograd.grad(loss, [leaves[k] for k in wrt], allow_unused=True)
    out = {"y": y.detach(), "last states": s.detach()}
    out.update({f"grad {k}": g for k, g in zip(wrt, grads) if g is not None})
    return out


def check_determinism(family, name, case):
    """The same call twice, and forward plus backward twice (where the implementation has
    gradients), give the same bits in every output and gradient."""
    entry, case = family.prepare(name, case)
    if not family.supported(entry, case):
        return
    x = family.make_inputs(case)
    a, b = _forward_backward(family, name, case, x), _forward_backward(family, name, case, x)
    for what in a:
        differ = ~same(a[what], b[what])
        if differ.any():
            raise AssertionError(
                f"{name}: two identical calls gave different {what} at {int(differ.sum())} positions, "
                f"first {_first(differ, a[what], b[what])}: not deterministic\n"
                f"  reproduce: {family.repro(name, case)}  # run twice")


# --- batch invariance ----------------------------------------------------------------------------

def _rows(family, x, rows):
    return {k: (v[rows] if k in family.batch_args and v is not None else v) for k, v in x.items()}


def _grown(family, x, other, before):
    """x's batch grown by the rows of ``other`` (after x's rows, or before them), with x's
    parameters and memory layout."""
    out = dict(x)
    for k in family.batch_args:
        if x[k] is not None:
            v = torch.cat([other[k], x[k]] if before else [x[k], other[k]])
            if not x[k].is_contiguous():  # the cases' strided form: every other element of a wider last axis
                wide = v.new_zeros(*v.shape[:-1], 2 * v.shape[-1])
                wide[..., ::2] = v
                v = wide[..., ::2]
            out[k] = v
    return out


def check_batch_invariance(family, name, case, i):
    """Row i's output and last state are the same alone and in its batch grown by b other rows
    after it or before it: bit for bit where the implementation declares
    ``batch_invariant``, else each within the tolerance policy of the float64 loop's row i."""
    entry, case = family.prepare(name, case)
    if not family.supported(entry, case):
        return
    i %= case.b
    x = family.make_inputs(case)
    other = family.make_inputs(dataclasses.replace(case, seed=(case.seed + 5) % 2**32))
    runs = {
        "alone": (_rows(family, x, slice(i, i + 1)), 0),
        f"with {case.b} other rows after it": (_grown(family, x, other, before=False), i),
        f"with {case.b} other rows before it": (_grown(family, x, other, before=True), case.b + i),
    }
    results = {}
    with torch.no_grad():
        for how, (inputs, row) in runs.items():
            y, s = family.scan(name, case, inputs)
            results[how] = (y[row:row + 1], s[row:row + 1])
    where = family.repro(name, case) + f"  # batch row {i}"
    if entry.supports["batch_invariant"]:
        (how0, (y0, s0)), *rest = results.items()
        for how, (y, s) in rest:
            for what, a, b in (("y", y0, y), ("last state", s0, s)):
                differ = ~same(a, b)
                if differ.any():
                    raise AssertionError(
                        f"{name}: batch row {i}'s {what} {how} differs from the row {how0} at "
                        f"{int(differ.sum())} positions, first {_first(differ, a, b)} (declared batch_invariant: "
                        f"bit for bit)\n  reproduce: {where}")
        return
    ref, loop = family.oracle(case)
    rows = slice(i, i + 1)
    for how, (y, s) in results.items():
        family.assert_matches_oracle(f"{name}, batch row {i} {how}", case, y, s, (ref[0][rows], ref[1][rows]),
                                     (loop[0][rows], loop[1][rows]), where)


# --- unwritten memory ----------------------------------------------------------------------------

@contextlib.contextmanager
def fresh_memory(value=float("nan")):
    """Within the block, every floating tensor made by torch.empty, torch.empty_like,
    torch.empty_strided or Tensor.new_empty comes filled with ``value`` (on a CPU, fresh memory is
    often zero, which hides an output that is never written where the true value is about 0)."""
    originals = dict(empty=torch.empty, empty_like=torch.empty_like, empty_strided=torch.empty_strided)
    new_empty = torch.Tensor.new_empty

    def filled(make):
        @functools.wraps(make)
        def call(*args, **kwargs):
            t = make(*args, **kwargs)
            if t.is_floating_point():
                with torch.no_grad():
                    t.fill_(value)
            return t
        return call

    for k, make in originals.items():
        setattr(torch, k, filled(make))
    torch.Tensor.new_empty = filled(new_empty)
    try:
        yield
    finally:
        for k, make in originals.items():
            setattr(torch, k, make)
        torch.Tensor.new_empty = new_empty


def check_unwritten_memory(family, name, case):
    """The call (forward, and backward where the implementation has gradients) run again with every
    fresh allocation NaN-filled: no output or gradient may be NaN there where it is not NaN in the
    ordinary run. Such a NaN is memory the implementation returned or read without writing it."""
    entry, case = family.prepare(name, case)
    if not family.supported(entry, case):
        return
    x = family.make_inputs(case)
    plain = _forward_backward(family, name, case, x)
    with fresh_memory(float("nan")):
        filled = _forward_backward(family, name, case, x)
    for what, a in plain.items():
        unwritten = torch.isnan(filled[what]) & ~torch.isnan(a)
        if unwritten.any():
            raise AssertionError(
                f"{name}: {what} is NaN at {int(unwritten.sum())} of {a.numel()} positions only when fresh memory "
                f"is NaN-filled (never written, or read before written); first positions "
                f"{unwritten.nonzero()[:8].tolist()}\n"
                f"  reproduce (a script of two lines):\n    import equivalence.properties\n"
                f"    with equivalence.properties.fresh_memory(): {family.repro(name, case)}")


# --- causality with non-finite perturbations -----------------------------------------------------

NONFINITE = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


def poisoned(family, x, arg, t, value):
    """A copy of inputs x with ``value`` at token t of ``arg``, batch row 0, the first element of
    every other axis."""
    # same strides as the original (clone() makes a strided view contiguous): elementwise kernels
    # may round differently on another layout, and the comparison is bit for bit
    v = torch.empty_strided(x[arg].shape, x[arg].stride(), dtype=x[arg].dtype).copy_(x[arg])
    index = [0] * v.dim()
    index[family.time_dim] = t
    v[tuple(index)] = value
    return {**x, arg: v}


def check_nonfinite_causality(family, name, case, t, poison):
    """A NaN, inf or -inf (``poison``) at token t of each time input in turn changes no output
    before t, bit for bit: every batch row, every channel."""
    entry, case = family.prepare(name, case)
    if not family.supported(entry, case):
        return
    x = family.make_inputs(case)
    t = min(t, case.l - 1)
    with torch.no_grad():
        y = family.scan(name, case, x)[0]
        for arg in family.time_args:
            if x[arg] is None:
                continue
            y2 = family.scan(name, case, poisoned(family, x, arg, t, NONFINITE[poison]))[0]
            before = y.narrow(family.time_dim, 0, t), y2.narrow(family.time_dim, 0, t)
            changed = ~same(*before)
            if changed.any():
                raise AssertionError(
                    f"{name}: {arg} = {poison} at token {t} (batch row 0) changed {int(changed.sum())} outputs "
                    f"before token {t}, first {_first(changed, *before)}: information flowed backwards in time\n"
                    f"  reproduce: {family.repro(name, case)}  # {arg}[token {t}] = {poison}")


def property_checks(family, name, small, k, poison):
    """{property: a call of its check} for the four properties above on one case (folded small by
    the caller: they need no long sequence), in the order a planted-bug search runs them."""
    return {
        "determinism": lambda: check_determinism(family, name, small),
        "batch invariance": lambda: check_batch_invariance(family, name, small, k),
        "unwritten memory": lambda: check_unwritten_memory(family, name, small),
        "non-finite causality": lambda: check_nonfinite_causality(family, name, small, k, poison),
    }
