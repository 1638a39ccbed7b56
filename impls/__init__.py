"""State-space scans behind one interface, one family per folder.

    import impls
    impls.names()                       # registered Mamba-1 implementation names
    impls.get("loop")                   # its entry: name, scan, step, supports, module, family
    impls.register("mine", scan=my_scan, step=my_step, gradients=True)
    y = impls.selective_scan(u, delta, A, B, C, ..., impl="parallel")
    y = impls.selective_state_update(state, x, dt, A, B, C, ..., impl="recurrent")

    impls.names(family="ssd")           # Mamba-2: loop, chunked, recurrent, parallel (mapped), ...
    impls.register("mine", scan=my_ssd_scan, step=my_ssd_step, family="ssd", gradients=True)
    y = impls.ssd_scan(x, dt, A, B, C, chunk_size, ..., impl="chunked")
    y = impls.ssd_state_update(state, x, dt, A, B, C, ..., impl="recurrent")

    impls.names(family="mamba3")        # Mamba-3: loop, chunked, recurrent
    out = impls.mamba3_scan(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, ..., impl="chunked")

The layout:
    registry.py     families (Family), register / names / get, capability refusals, plugin loading
    frontdoor.py    the letters (b, l, d, h, p, n, ...), the dtype policy, family-neutral argument checks
    selective/      Mamba-1: its front door, the loop spec, parallel, recurrent, Triton kernels
    ssd/            Mamba-2 SSD: its front door, the loop spec, chunked, recurrent, the mapping, Triton, varlen
    mamba3/         Mamba-3 (SISO): its front door, the loop spec, chunked, recurrent (the step)
    adapters/       other people's scans (official kernels, mamba.py, transformers) and their known failures
    models/         language models built on the scans
"""

from . import registry
from .registry import (ENTRY_POINT_GROUP, FAMILIES, Family, Implementation, add_family, get, get_family, lazy,
                       load_plugins, names, register, unregister)

# The families, in the order their built-ins register (the SSD family maps Mamba-1's implementations).
from .selective import selective_scan, selective_state_update  # noqa: E402
from .ssd import ssd_scan, ssd_state_update  # noqa: E402
from .mamba3 import mamba3_scan, mamba3_state_update  # noqa: E402
from .adapters import register_mamba_ssm, register_mamba_ssm_ssd, register_transformers_ssd  # noqa: E402

# Installed packages last: built-in names are taken first, so a plugin cannot shadow them.
BUILTIN = names()
PLUGINS = load_plugins()
