"""Adapters: other people's scans behind our interfaces, each with its capability table here and its
known failures in xfails/ (one test-id prefix per line, with the reason; ``pytest --xfails-file``).

    mambapy.py           mamba.py's pscan and step (pure PyTorch), Mamba-1; registered when installed
    mambapy_model.py     mamba.py's language model, the peer of our MambaLM in benchmarks
    mamba_ssm.py         the official CUDA/Triton kernels, Mamba-1 and SSD; registered with a GPU
    transformers_ssd.py  transformers' pure-PyTorch Mamba-2 SSD; registered on request (importing it)
"""

import importlib.util

import torch

from ..registry import lazy, register

# mamba.py's pscan and step (mambapy.py), the pure-PyTorch peer, when mambapy is
# installed (a dev dependency). It has one B and C per token: grouped B/C is a declared gap, and so
# is varlen (mamba.py has no packed sequences and no batch-indexed cache). Non-finite inputs too: the
# pscan multiplies decays together before applying them, so where a product of decays underflows to
# 0 an inf state becomes 0 x inf = NaN, where the loop's stays inf (pinned in test_values.py).
if importlib.util.find_spec("mambapy") is not None:
    register("mambapy", lazy("adapters.mambapy", "selective_scan"), step=lazy("adapters.mambapy", "selective_state_update"),
             gradients=True, grouped=False, nonfinite_inputs=False, batch_invariant=False)

# The official kernels (mamba_ssm.py), where mamba_ssm imports and there is a GPU.
# Their known gaps are declared; their known bugs are in xfails/mamba_ssm.txt.
# varlen=False: the official Mamba-1 kernel has no packed sequences (requested since 2024).
# deterministic=False: its backward sums dD and ddelta_bias over thread blocks with atomic adds; batch
# invariance is not measured on a GPU here, so its rows are held to the tolerance policy.
MAMBA_SSM_SUPPORTS = dict(dtypes=(torch.float32, torch.float16, torch.bfloat16), initial_state=False, gradients=True,
                          varlen=False, deterministic=False, batch_invariant=False)


def register_mamba_ssm(name="mamba_ssm"):
    """Register the official kernels' adapter under ``name`` (equivalence/test_mamba_ssm.py also
    registers it over a stand-in package, on the CPU, to test the adapter's translation)."""
    return register(name, lazy("adapters.mamba_ssm", "selective_scan"),
                    step=lazy("adapters.mamba_ssm", "selective_state_update"), **MAMBA_SSM_SUPPORTS)


if importlib.util.find_spec("mamba_ssm") is not None and torch.cuda.is_available():
    register_mamba_ssm()

# transformers' Mamba-2 pure-PyTorch chunked SSD (transformers_ssd.py), the CPU peer of
# `chunked`. Registered on request only (importing impls.adapters.transformers_ssd registers it:
# `pytest --ssd-impl impls.adapters.transformers_ssd --xfails-file xfails/transformers_ssd.txt`;
# the SSD benchmark does so): its known bugs, listed in that file with their reasons, would fail the
# default run. Gaps: D (h, p); float64 (its scan computes in float32); the half dtypes (it adds dt_bias
# and applies softplus in the input dtype, far outside the tolerance policy); varlen (its torch path
# takes no seq_idx or cu_seqlens, its step no state_batch_indices). Its step has no dt_limit,
# a capability the entry would share with the scan: the entry carries the scan only, and the step is
# checked in equivalence/test_ssd_adapters.py on the cases it can serve.
TRANSFORMERS_SSD_SUPPORTS = dict(dtypes=(torch.float32,), D_hp=False, gradients=True, batch_invariant=False)


def register_transformers_ssd(name="transformers"):
    """Register transformers' pure-PyTorch SSD scan in the ssd family under ``name``."""
    return register(name, lazy("adapters.transformers_ssd", "ssd_scan"), family="ssd", **TRANSFORMERS_SSD_SUPPORTS)


# The official Mamba-2 kernels (mamba_ssm.py), where mamba_ssm imports and there is
# a GPU. Gaps: float64; varlen (it has seq_idx, cu_seqlens and return_varlen_states, but its
# initial_states reaches only a row's first sequence: no per-sequence initial states, which the
# varlen properties need; its step's state_batch_indices is not wired through the adapter). Its
# step has no dt_limit (nor the clamp at 0 of a negative dt): a known official bug, an expected
# failure in xfails/mamba_ssm_ssd.txt, while its scan's dt_limit is tested.
# deterministic=False: a known dD race in its backward (the official determinism
# test exempts it); batch invariance as for Mamba-1's.
MAMBA_SSM_SSD_SUPPORTS = dict(dtypes=(torch.float32, torch.float16, torch.bfloat16), gradients=True,
                              deterministic=False, batch_invariant=False)


def register_mamba_ssm_ssd(name="mamba_ssm"):
    """Register the official Mamba-2 kernels' adapter in the ssd family under ``name``
    (equivalence/test_ssd_adapters.py registers it over a stand-in package, on the CPU)."""
    return register(name, lazy("adapters.mamba_ssm", "ssd_scan"), step=lazy("adapters.mamba_ssm", "ssd_state_update"),
                    family="ssd", **MAMBA_SSM_SSD_SUPPORTS)


if importlib.util.find_spec("mamba_ssm") is not None and torch.cuda.is_available():
    register_mamba_ssm_ssd()

# The official Mamba-3 SISO kernels (mamba3.py), where mamba_ssm imports and there is a GPU.
# dtypes: bfloat16 only, because mamba3_siso_combined casts Q, K, V, Trap, Angles and Z to bfloat16
# (the adapter also refuses float32 Q, K, Trap, Angles beside bfloat16 V, odd n_ang, l = 0, and
# head sizes or chunk sizes its Triton tiles do not serve). state_batch_indices: the official indexed
# step is unmerged. nonfinite_inputs, deterministic, batch_invariant: not measured on a GPU here.
# Its known bugs (bfloat16 angles, approximate tanh, ...) are in xfails/mamba3.txt.
MAMBA3_SUPPORTS = dict(dtypes=(torch.bfloat16,), gradients=True, varlen=True, state_batch_indices=False,
                       nonfinite_inputs=False, deterministic=False, batch_invariant=False)


def register_mamba3(name="mamba_ssm"):
    """Register the official Mamba-3 SISO kernels' adapter in the mamba3 family under ``name``
    (equivalence/mamba3/test_adapter.py registers it over a stand-in package, on the CPU)."""
    return register(name, lazy("adapters.mamba3", "mamba3_scan"), step=lazy("adapters.mamba3", "mamba3_state_update"),
                    family="mamba3", **MAMBA3_SUPPORTS)


if importlib.util.find_spec("mamba_ssm") is not None and torch.cuda.is_available():
    register_mamba3()
