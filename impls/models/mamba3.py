"""A small, real Mamba-3 (SISO) language model whose scan runs through any registered Mamba-3 implementation.

The Mamba-3 block of the paper (Lahoti et al., "Mamba-3: Improved Sequence Modeling using State
Space Principles", ICLR 2026) and of the official code (https://github.com/state-spaces/mamba:
mamba_ssm/modules/mamba3.py for the block, mamba_ssm/models/mixer_seq_simple.py for the stack,
mamba_ssm/ops/triton/layernorm_gated.py for the norms):

    in_proj -> z, x, B, C, dd_dt, dd_A, trap, angle       (one projection, no conv1d)
    DT  = softplus(dd_dt + dt_bias)                        (h per token)
    A   = min(-heavy_tail(dd_A), -A_floor)                 (h per token; -softplus before mid-2026)
    ADT = A DT                                             (the scan's log-decay: alpha = exp(ADT))
    B, C = RMSNorm over n (B_norm, C_norm), then + B_bias, C_bias inside the scan
    angles (n_ang per token) shared by every head
    y = mamba3_scan(Q=C, K=B, V=x, ADT, DT, Trap=trap, Q_bias=C_bias, K_bias=B_bias, Angles, D,
                    Z=z unless is_outproj_norm)
    y = RMSNorm(y) per head * weight * silu(z)             (only with is_outproj_norm)
    out_proj(y)

stacked as a pre-norm residual stream (impls/models/lm.py). Parameter names and shapes are those of
the official module; config fields are the official MambaConfig with ``ssm_cfg = {"layer": "Mamba3",
...}``. Nothing is fetched from a hub. transformers (5.24.0, pinned) has no Mamba-3 model, so the
official layout is the only one.

Letters as in the Mamba-3 scan (impls/mamba3/loop.py): b batch, l sequence length, h heads
(``nheads``), p head dimension (``headdim``), n state size (``d_state``), g groups of B and C
(``ngroups``, the scan's h_qk), n_ang rotated pairs (``num_rope_angles``), R the MIMO rank (1 for
SISO); also m = d_model, d = d_inner = expand * m = h * p, v = the padded vocabulary.

Which A: the official module switched from -softplus(dd_A) to -heavy_tail(dd_A) in June 2026 with
no config field to tell the two apart, and checkpoints of both generations exist. ``A_activation``
in ssm_cfg ("heavy_tail", the default, or "softplus") selects it; the official module ignores the
key (it absorbs unknown kwargs), so a config written here still loads there.

MIMO (``is_mimo``): the config and the parameter shapes carry ``mimo_rank``, but the model refuses
is_mimo=True until impls/mamba3 has the MIMO scan (rank-R state updates, pairs rotated (i, i + n/2))
and this mixer its mimo_x, mimo_z, mimo_o projections.

Left padding: DT is zeroed at padded positions (so ADT = 0: no decay, no input, no angle step) and
so is x (so the next real token's trapezoid term, which reads the previous v, adds nothing): every
state is exactly zero when a row's first real token arrives, as if unpadded.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

import impls
from ..frontdoor import compute_dtype
from . import checkpoints
from .checkpoints import read_config_json
from .lm import LanguageModel, RMSNorm, dt_bias_init
from .mamba2 import GatedRMSNorm

BC_NORM_EPS = 1e-5   # the official B_norm, C_norm and output norm are built with eps=1e-5

# ssm_cfg keys of the official Mamba-3 mixer (mamba3.Mamba3.__init__) and their defaults, plus
# A_activation (ours: see the module docstring). dropout is absorbed and unused, as there.
SSM_DEFAULTS = dict(d_state=128, expand=2, headdim=64, ngroups=1, rope_fraction=0.5, dt_min=0.001, dt_max=0.1,
                    dt_init_floor=1e-4, A_floor=1e-4, is_outproj_norm=False, is_mimo=False, mimo_rank=4,
                    fuse_pregate_headwise_norm=True, chunk_size=64, dropout=0.0, A_activation="heavy_tail")
A_ACTIVATIONS = ("heavy_tail", "softplus")
MIMO_MISSING = ("is_mimo=True: Mamba-3 MIMO is not implemented here yet: it needs the rank-R Mamba-3 scan "
                "(impls/mamba3 has SISO only) and this mixer's mimo_x, mimo_z, mimo_o projections")


def negative_heavy_tail(x):
    """-heavy_tail(x), the official heavy_tail_activation negated: -(1 + x) for x >= 0, -1 / (1 - x) for
    x < 0. Written as 1 / (min(x, 0) - 1) - max(x, 0), each term the exact negation of the official
    max(x, 0) + 1 / (1 - min(x, 0))'s, so bit for bit its negation, in one op fewer (a decoding step
    computes it per layer and token)."""
    return torch.reciprocal(x.clamp_max(0) - 1) - x.clamp_min(0)


class Mamba3Config:
    """The fields of an official Mamba-3 ``config.json`` (mamba_ssm.models.config_mamba.MambaConfig with
    ``ssm_cfg = {"layer": "Mamba3", ...}``), official defaults. Checked on construction: nothing is
    built from an invalid config.

    Resolved attributes: every ssm_cfg key (d_state, headdim, ngroups, rope_fraction, A_floor,
    A_activation, chunk_size, ...), d_inner (d), nheads (h), mimo_rank (R: 1 unless is_mimo, as the
    official module), num_rope_angles (n_ang), d_in_proj, padded_vocab_size (v).

    Raises:
        ValueError: a size that is not an int (the field named), a size below 1, d_inner not a multiple
            of headdim, nheads not a multiple of ngroups, an odd d_state (the scan rotates pairs), a
            rope_fraction other than 0.5 or 1.0, no rotated pair, an unknown A_activation, a negative
            A_floor, an unknown ssm_cfg key;
        NotImplementedError: another layer (named, with its loader), is_mimo, attention or MLP layers.
    """

    FIELDS = checkpoints.OFFICIAL_FIELDS
    to_dict, __eq__, __repr__ = checkpoints.official_dict, checkpoints.same_config, checkpoints.config_repr

    def __init__(self, **fields):
        """fields: the official config.json's (checkpoints.OFFICIAL_DEFAULTS), ssm_cfg with SSM_DEFAULTS' keys."""
        s = checkpoints.set_official_fields(self, "Mamba3", SSM_DEFAULTS,
                                            ("d_state", "headdim", "ngroups", "chunk_size", "mimo_rank"), fields)
        where = "Mamba3Config"
        self.d_state, self.headdim, self.ngroups, self.chunk_size, mimo_rank = (
            s[k] for k in ("d_state", "headdim", "ngroups", "chunk_size", "mimo_rank"))
        self.rope_fraction, self.A_floor = float(s["rope_fraction"]), float(s["A_floor"])
        self.dt_min, self.dt_max, self.dt_init_floor = float(s["dt_min"]), float(s["dt_max"]), float(s["dt_init_floor"])
        self.is_outproj_norm, self.is_mimo = bool(s["is_outproj_norm"]), bool(s["is_mimo"])
        self.fuse_pregate_headwise_norm, self.dropout = bool(s["fuse_pregate_headwise_norm"]), s["dropout"]
        self.A_activation = s["A_activation"]
        if self.is_mimo:
            raise NotImplementedError(f"{where}: ssm_cfg.{MIMO_MISSING} (mimo_rank = {mimo_rank})")
        self.mimo_rank = mimo_rank if self.is_mimo else 1   # the official module ignores mimo_rank for SISO
        if self.d_state % 2:
            raise ValueError(f"{where}: ssm_cfg.d_state = {self.d_state} must be even (B and C are rotated in pairs)")
        if self.rope_fraction not in (0.5, 1.0):
            raise ValueError(f"{where}: ssm_cfg.rope_fraction = {s['rope_fraction']!r}: the official module allows "
                             f"0.5 or 1.0")
        # the official count: int(d_state * rope_fraction) rotated dimensions, rounded down to even
        rotated = int(self.d_state * self.rope_fraction)
        self.num_rope_angles = (rotated - rotated % 2) // 2
        if self.num_rope_angles < 1:
            raise ValueError(f"{where}: ssm_cfg.d_state = {self.d_state} with rope_fraction = {self.rope_fraction} "
                             f"rotates no pair (the official module asserts at least one)")
        if self.A_activation not in A_ACTIVATIONS:
            raise ValueError(f"{where}: ssm_cfg.A_activation = {self.A_activation!r}: expected one of {A_ACTIVATIONS}")
        if not self.A_floor >= 0:
            raise ValueError(f"{where}: ssm_cfg.A_floor = {s['A_floor']!r}: expected a number >= 0")
        g, n, h, R = self.ngroups, self.d_state, self.nheads, self.mimo_rank
        # the official order: [z, x, B, C, dd_dt, dd_A, trap, angle]
        self.in_proj_split = (self.d_inner, self.d_inner, g * n * R, g * n * R, h, h, h, self.num_rope_angles)
        self.d_in_proj = sum(self.in_proj_split)


def parameter_shapes(config):
    """Parameter name -> shape of an official checkpoint of this config, from the config alone
    (nothing is built); lm_head.weight included (a tied or safetensors checkpoint may omit it)."""
    c = config
    m, d, h, n, R = c.d_model, c.d_inner, c.nheads, c.d_state, c.mimo_rank
    mixer = {"in_proj.weight": (c.d_in_proj, m), "dt_bias": (h,), "B_bias": (h, R, n), "C_bias": (h, R, n),
             "B_norm.weight": (n,), "C_norm.weight": (n,), "D": (h,), "out_proj.weight": (m, d)}
    if c.is_outproj_norm:
        mixer["norm.weight"] = (d,)
    return checkpoints.stack_shapes(c, mixer)


class LayerCache:
    """What one layer keeps between decoding steps (constant size, whatever the position).

    angle (b, h, n_ang), ssm_state (b, h, p, n), k (b, h, n), v (b, h, p): the scan's four states in
    the compute dtype (k: the last token's B, biased and rotated; v: its x), replaced at each step;
    D, dt_bias (h,), B_bias, C_bias (h, n): the parameters in the compute dtype, made once per cache;
    proj (b, d_in_proj): in_proj's output buffer in the model dtype, with its views z, x (b, h, p),
    BC_in (b, 2, g, n) (B and C side by side), dd_dt, dd_A, trap (b, h), angles (b, h, n_ang);
    BC (b, 2, g, n): B and C normed, in the compute dtype, with BC_weight (2, 1, n) the two norms'
    weights, eps (1, 1, 1) and mean_sq (b 2 g, 1, 1) (Mamba3Mixer.norm_bc).
    """

    __slots__ = ("angle", "ssm_state", "k", "v", "D", "dt_bias", "B_bias", "C_bias", "proj", "z", "x", "BC_in",
                 "dd_dt", "dd_A", "trap", "angles", "BC", "BC_weight", "eps", "mean_sq")

    def __init__(self, mixer, b, dtype, device):
        f = compute_dtype(dtype)
        h, p, g, n = mixer.nheads, mixer.headdim, mixer.ngroups, mixer.d_state
        self.angle = torch.zeros(b, h, mixer.num_rope_angles, dtype=f, device=device)
        self.ssm_state = torch.zeros(b, h, p, n, dtype=f, device=device)
        self.k = torch.zeros(b, h, n, dtype=f, device=device)
        self.v = torch.zeros(b, h, p, dtype=f, device=device)
        self.D, self.dt_bias, self.B_bias, self.C_bias = mixer.ssm_params(f)
        self.proj = torch.empty(b, sum(mixer.in_proj_split), dtype=dtype, device=device)
        z, x, _, _, self.dd_dt, self.dd_A, self.trap, angles = self.proj.split(mixer.in_proj_split, dim=-1)
        self.z, self.x = z.unflatten(-1, (h, p)), x.unflatten(-1, (h, p))                # (b, h, p)
        d2 = 2 * mixer.d_inner
        self.BC_in = self.proj[:, d2:d2 + 2 * g * n].unflatten(-1, (2, g, n))           # B, C side by side
        self.angles = angles[:, None, :].expand(b, h, mixer.num_rope_angles)             # shared by the heads
        self.BC = torch.empty(b, 2, g, n, dtype=f, device=device)
        self.BC_weight = torch.stack((mixer.B_norm.weight, mixer.C_norm.weight)).detach().to(f)[:, None, :]
        self.eps = torch.full((1, 1, 1), BC_NORM_EPS, dtype=f, device=device)
        self.mean_sq = torch.empty(b * 2 * g, 1, 1, dtype=f, device=device)

    def states(self):
        return self.angle, self.ssm_state, self.k, self.v

    def tensors(self):
        return (*self.states(), self.D, self.dt_bias, self.B_bias, self.C_bias, self.proj, self.BC, self.BC_weight,
                self.eps, self.mean_sq)


class Mamba3Mixer(nn.Module):
    """The Mamba-3 SISO block (official name: ``Mamba3``, stored as ``mixer``), parameters as in the checkpoints:

    in_proj.weight (2d + 2gnR + 3h + n_ang, m) producing [z, x, B, C, dd_dt, dd_A, trap, angle],
    dt_bias (h,), B_bias and C_bias (h, R, n), B_norm.weight and C_norm.weight (n,), D (h,),
    norm.weight (d,) with is_outproj_norm, out_proj.weight (m, d). No biases on the projections.
    """

    def __init__(self, config):
        super().__init__()
        c = config
        self.d_inner, self.d_state, self.headdim, self.nheads = c.d_inner, c.d_state, c.headdim, c.nheads
        self.ngroups, self.num_rope_angles, self.chunk_size = c.ngroups, c.num_rope_angles, c.chunk_size
        self.A_floor, self.A_activation, self.in_proj_split = c.A_floor, c.A_activation, c.in_proj_split
        h, n, R = c.nheads, c.d_state, c.mimo_rank
        self.in_proj = nn.Linear(c.d_model, c.d_in_proj, bias=False)
        self.dt_bias = nn.Parameter(torch.empty(h))
        self.B_bias = nn.Parameter(torch.ones(h, R, n))
        self.C_bias = nn.Parameter(torch.ones(h, R, n))
        self.B_norm = RMSNorm(n, BC_NORM_EPS)     # the official RMSNormGated called without z: over n
        self.C_norm = RMSNorm(n, BC_NORM_EPS)
        self.D = nn.Parameter(torch.ones(h))
        # per head (group_size = headdim), gate after the norm, as the official module builds it
        self.norm = GatedRMSNorm(c.d_inner, h, True, eps=BC_NORM_EPS) if c.is_outproj_norm else None
        self.out_proj = nn.Linear(c.d_inner, c.d_model, bias=False)
        self.reset_dt_bias(c)

    @torch.no_grad()
    def reset_dt_bias(self, c):
        """The official initialisation: dt log-uniform in [dt_min, dt_max] (floored), stored through the
        inverse of softplus in dt_bias. B_bias, C_bias and D start at 1, the norms' weights at 1."""
        self.dt_bias.copy_(dt_bias_init(self.nheads, c))

    def ssm_params(self, f):
        """D (h,), dt_bias (h,), B_bias and C_bias (h, n) (the SISO rank squeezed) in the compute dtype f."""
        return tuple(t.detach().to(f) for t in (self.D, self.dt_bias, self.B_bias[:, 0], self.C_bias[:, 0]))

    def decay_inputs(self, dd_dt, dd_A, dt_bias):
        """DT = softplus(dd_dt + dt_bias) and ADT = A DT with A = min(-act(dd_A), -A_floor), act the
        config's (heavy_tail or softplus). dd_dt, dd_A (..., h) and dt_bias (h,) in the compute dtype."""
        neg_act = negative_heavy_tail(dd_A) if self.A_activation == "heavy_tail" else -F.softplus(dd_A)
        DT = F.softplus(dd_dt + dt_bias)
        return DT, neg_act.clamp_max(-self.A_floor) * DT

    def forward(self, hidden, mask=None, impl=None, cache=None):
        """The block over a whole sequence: one Mamba-3 scan.

        Args:
            hidden: (b, l, m)
            mask: (b, l) 1 for a real token, 0 for left padding, in hidden's dtype, or None
            impl: the registered Mamba-3 implementation for impls.mamba3_scan (None: its default)
            cache: a LayerCache to fill with the four states after the last token (prefill), or None
        Returns:
            (b, l, m)
        """
        b, l, _ = hidden.shape
        h, p, g, n = self.nheads, self.headdim, self.ngroups, self.d_state
        f = compute_dtype(hidden.dtype)
        z, x, B, C, dd_dt, dd_A, trap, angles = self.in_proj(hidden).split(self.in_proj_split, dim=-1)
        D, dt_bias, B_bias, C_bias = self.ssm_params(f)
        DT, ADT = self.decay_inputs(dd_dt.to(f), dd_A.to(f), dt_bias)            # (b, l, h)
        if mask is not None:
            DT, ADT = DT * mask[..., None].to(f), ADT * mask[..., None].to(f)    # padding: no decay, input or turn
            x = x * mask[..., None]                                             # and no v for the next token
        B = self.B_norm(B.unflatten(-1, (g, n)))                                 # (b, l, g, n)
        C = self.C_norm(C.unflatten(-1, (g, n)))
        angles = angles.to(f)[:, :, None, :].expand(b, l, h, self.num_rope_angles)   # shared by the heads
        kw = {} if impl is None else {"impl": impl}
        out = impls.mamba3_scan(C, B, x.unflatten(-1, (h, p)), ADT.transpose(1, 2), DT.transpose(1, 2),
                                trap.transpose(1, 2), C_bias, B_bias, angles, D,
                                None if self.norm is not None else z.unflatten(-1, (h, p)), None,
                                self.chunk_size, cache is not None, **kw)
        if cache is not None:
            out, *states = out
            cache.angle, cache.ssm_state, cache.k, cache.v = states
        y = out.flatten(-2)                                                      # (b, l, d)
        if self.norm is not None:
            y = self.norm(y, z)
        return self.out_proj(y.to(hidden.dtype))

    def new_cache(self, b, dtype, device, fused):
        """An empty LayerCache for b rows (states in the compute dtype); ``fused`` changes nothing."""
        return LayerCache(self, b, dtype, device)

    def norm_bc(self, cache):
        """B_norm and C_norm of the token's B and C (cache.BC_in) into cache.BC, both at once: the mean of
        squares of every (row, group) as one baddbmm with eps as its input, then rsqrt_ and the weights
        (F.rms_norm on a CPU dispatches six ops for each). Returns (C, B), each (b, g, n)."""
        BC = cache.BC
        BC.copy_(cache.BC_in)
        rows = BC.view(-1, 1, self.d_state)
        torch.baddbmm(cache.eps, rows, rows.transpose(1, 2), alpha=1.0 / self.d_state, out=cache.mean_sq)
        rows.mul_(cache.mean_sq.rsqrt_())
        BC.mul_(cache.BC_weight)
        return BC[:, 1], BC[:, 0]

    def step_y(self, hidden, cache, step_fn, impl):
        """in_proj and one Mamba-3 step for one token, the cache's states replaced by the new ones.
        hidden: (b, m). Returns y (b, d) before out_proj; cache.z holds the token's z."""
        f = cache.ssm_state.dtype
        torch.mm(hidden, self.in_proj.weight.t(), out=cache.proj)
        DT, ADT = self.decay_inputs(cache.dd_dt.to(f), cache.dd_A.to(f), cache.dt_bias)    # (b, h)
        C, B = self.norm_bc(cache)
        args = (C, B, cache.x, ADT, DT, cache.trap, cache.C_bias, cache.B_bias, cache.angles, cache.D,
                None if self.norm is not None else cache.z, cache.states())
        if step_fn is None:
            y, states = impls.mamba3_state_update(*args, impl=impl)
        else:
            y, states = step_fn(*args, None)
        cache.angle, cache.ssm_state, cache.k, cache.v = states
        return y.reshape(y.shape[0], self.d_inner)

    def step(self, hidden, cache, phase, step_fn, impl, residual):
        """The block for one new token, from the cache, which it advances.

        Args:
            hidden: (b, m) normed; cache: this layer's LayerCache; phase: unused (no conv)
            step_fn: the implementation's step, called directly, or None: through impls.mamba3_state_update
            impl: the registered Mamba-3 implementation's name
            residual: (b, m)
        Returns:
            residual + the block's output (b, m), a new tensor
        """
        y = self.step_y(hidden, cache, step_fn, impl)
        if self.norm is not None:
            y = self.norm(y, cache.z.flatten(-2))
        return residual + self.out_proj(y.to(hidden.dtype))

    def fused_step(self, hidden, cache, phase, step_fn, impl, residual):
        """``step`` with the block's output added into residual (b, m) in place (float32/float64 models)."""
        y = self.step_y(hidden, cache, step_fn, impl)
        if self.norm is not None:
            y = self.norm(y, cache.z.flatten(-2))
        residual.addmm_(y, self.out_proj.weight.t())


class Mamba3LM(LanguageModel):
    """The Mamba-3 language model (official ``MambaLMHeadModel`` with Mamba3 layers): backbone + LM head.

    ``Mamba3LM(Mamba3Config(d_model=64, n_layer=2, vocab_size=256, ssm_cfg=dict(d_state=16, headdim=16)))``
    builds a tiny random model with the official initialisation; ``state_dict()`` keys are the
    official checkpoint's. Forward, prefill, step, generate, save_pretrained and from_pretrained:
    impls/models/lm.py (LanguageModel). The decoding cache holds (angle, ssm, k, v) per layer.
    """

    family = "mamba3"
    mixer = Mamba3Mixer
    step_default = impls.mamba3_state_update.__kwdefaults__["impl"]
    weight_names = {}   # one layout only: no weight is renamed

    @staticmethod
    def read_config(folder):
        return read_config(folder)

    @staticmethod
    def parameter_shapes(config):
        return parameter_shapes(config)

    def checkpoint_config(self, layout, safe_serialization):
        """The official config.json dict. Raises ValueError for layout="transformers": transformers has
        no Mamba-3 model (5.24.0)."""
        if layout != "official":
            raise ValueError("save_pretrained: layout='transformers': transformers (5.24.0) has no Mamba-3 model; "
                             "only the official layout exists")
        return self.config.to_dict()


def read_config(folder):
    """(Mamba3Config, "official") from ``folder``/config.json, checked before anything is built.
    Another model's folder (official or transformers layout) is a ValueError naming it."""
    cfg = read_config_json(folder)
    checkpoints.check_folder_model(cfg, folder, "Mamba3")
    return checkpoints.read_official_config(cfg, folder, Mamba3Config), "official"
