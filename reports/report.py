"""Turn loaded results (reports/load.py) into report.md and report.html with PNG plots.

Sections, each present only when its data is: where the results come from (thread counts and load)
and what could not be read or was left out; the targets of docs/figures.md, met or not; time per token
against prefix length on log-log axes, one figure per level, with fitted slopes and their
intervals; cumulative generation time with its fitted L² term; the scan speed grid as paired ratios
to the floor and to the best peer, with absolute ms; against mamba.py; the decode cost split;
accuracy against the float64 loop (verdict per implementation, then every case); pytest-benchmark
timings. Every section lists
the implementations its sweep left out, with the reason. Ratios come from paired, interleaved
measurements (benchmarks/common.py); points marked unstable are never drawn or fitted.
"""

import html
import os

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from benchmarks.slopes import fit_quadratic, fit_slope  # noqa: E402



def _rows(data, benchmark, kind=None):
    """The timed rows of one benchmark (and, for time_per_token, one kind of point)."""
    rows = data[data["benchmark"] == benchmark]
    if kind is not None:
        rows = rows[rows["kind"] == kind] if "kind" in rows else rows.iloc[:0]
    rows = rows.dropna(axis=1, how="all")
    if "median_s" not in rows:
        return rows
    rows = rows[rows["median_s"].notna()]
    if "cpu_median_s" in rows:  # CPU time of the measuring process: descheduling by other processes does not count
        rows = rows.assign(wall_s=rows["median_s"], median_s=rows["cpu_median_s"].fillna(rows["median_s"]))
    return rows


def _series(rows, keys):
    """Group rows into series by ``keys`` (ignoring keys not present), each sorted by L."""
    keys = [k for k in keys if k in rows]
    for name, group in rows.groupby(keys, dropna=False):
        yield dict(zip(keys, name if isinstance(name, tuple) else (name,))), group.sort_values("L")


SLOPE_RESOLVED = 0.3               # a slope whose 95 % half-width is wider than this is "not resolved"


def _stable(rows):
    """Rows whose paired ratio is not marked unstable (those are never drawn or fitted)."""
    return rows[~rows["unstable"].fillna(False).astype(bool)] if "unstable" in rows else rows


def _fit(g):
    """fit_slope over a series' (L, median_s), or None with fewer than 3 lengths."""
    g = g.groupby("L", as_index=False)["median_s"].median()
    return fit_slope(g["L"].to_numpy(), g["median_s"].to_numpy()) if len(g) >= 3 else None


def not_fitted(stable):
    """The label of a series too short to fit: 'not fitted: N stable points' (N distinct lengths)."""
    n = stable["L"].nunique() if "L" in stable else len(stable)
    return f"not fitted: {n} stable point{'' if n == 1 else 's'}"


def slope_label(fit):
    """'slope 1.00 ± 0.03', or 'slope not resolved (± 0.45)' when the 95 % half-width exceeds SLOPE_RESOLVED."""
    half = (fit["ci_high"] - fit["ci_low"]) / 2
    if not np.isfinite(half) or half > SLOPE_RESOLVED:
        return f"slope not resolved (±{half:.2f})" if np.isfinite(half) else "slope not resolved"
    return f"slope {fit['slope']:.2f} ± {half:.2f}"


def slope_table(data, kind="per_token"):
    """Fitted log-log slope of time (per token, or cumulative) against L for every series, unstable points left out."""
    rows = _rows(data, "time_per_token", kind)
    out = []
    if rows.empty:
        return pd.DataFrame()
    for key, g in _series(rows, ["source", "level", "impl", "mode"]):
        dropped = len(g) - len(_stable(g))
        fit = _fit(_stable(g))
        common = dict(unstable_left_out=dropped, L_min=int(g["L"].min()), L_max=int(g["L"].max()),
                      threads=_threads(g), ms_at_L_max=1e3 * float(g.sort_values("L")["median_s"].iloc[-1]))
        if fit is None:   # still a row: every series the figure draws is accounted for
            out.append(dict(key, slope=np.nan, ci95=np.nan, resolved=False, fit=not_fitted(_stable(g)),
                            points=int(_stable(g)["L"].nunique()), **common))
            continue
        half = (fit["ci_high"] - fit["ci_low"]) / 2
        out.append(dict(key, slope=fit["slope"], ci95=half, resolved=bool(np.isfinite(half) and half <= SLOPE_RESOLVED),
                        fit="fitted", points=fit["n"], **common))
    return pd.DataFrame(out)


def reforward_table(data):
    """Re-forwarding the prefix against one recurrent step at the same L, measured interleaved."""
    rows = _rows(data, "time_per_token", "per_token")
    if rows.empty or "ratio_to" not in rows:
        return pd.DataFrame()
    rows = rows[(rows["mode"] == "reforward") & rows["ratio"].notna() & (rows["ratio_to"] != "mambapy")]
    cols = [c for c in ("source", "level", "impl", "L", "threads", "median_s", "ratio", "ratio_q1", "ratio_q3", "unstable")
            if c in rows]
    out = rows[cols].sort_values([c for c in ("source", "level", "impl", "L") if c in cols]).reset_index(drop=True)
    return out.rename(columns={"median_s": "reforward_s", "ratio": "reforward_over_step"})


def _threads(rows):
    """The thread counts of rows' points, as '1' or '1, 2'."""
    if "threads" not in rows:
        return None
    return ", ".join(str(int(t)) for t in sorted(rows["threads"].dropna().unique()))


def _label_axes(ax, xlabel, ylabel, title):
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def _save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_time_per_token(data, out_dir):
    """One figure per level (legible at the page's width): {level: png path}."""
    rows = _stable(_rows(data, "time_per_token", "per_token"))
    if rows.empty:
        return {}
    paths = {}
    for level in sorted(rows["level"].dropna().unique()):
        part = rows[rows["level"] == level]
        fig, ax = plt.subplots(figsize=(8, 5))
        for key, g in _series(part, ["source", "impl", "mode"]):
            g = g.groupby("L", as_index=False)["median_s"].median()
            style = "-" if key.get("mode") == "recurrent" else "--"
            label = " / ".join(str(key[k]) for k in ("impl", "mode") if k in key)
            if part["source"].nunique() > 1:
                label += f" [{key['source']}]"
            fit = _fit(g)
            label += f": {slope_label(fit)}" if fit is not None else f": {not_fitted(g)}"
            ax.loglog(g["L"], g["median_s"] * 1e3, style, marker="o", ms=3, label=label)
        _label_axes(ax, "prefix length L (tokens)", "time per generated token (ms)",
                    f"{level} level: re-forward (dashed) vs recurrent (solid); slopes with 95 % intervals")
        paths[level] = _save(fig, os.path.join(out_dir, f"time_per_token_{level}.png"))
    return paths


MODES = {"reforward": "re-forward", "recurrent": "recurrent"}


def _cumulative_fits(data):
    """[(key, the series' stable medians by L, its row of cumulative_table)] for every cumulative series:
    t(L) = a + b L + c L^2 fitted (benchmarks/slopes.py fit_quadratic), unstable points left out."""
    rows = _rows(data, "time_per_token", "cumulative")
    if rows.empty:
        return []
    out = []
    for key, g in _series(rows, ["source", "level", "impl", "mode"]):
        stable = _stable(g).groupby("L", as_index=False)["median_s"].median()
        fit = fit_quadratic(stable["L"], stable["median_s"]) if len(stable) >= 4 else None
        row = dict(key, points=len(stable), L_min=int(g["L"].min()), L_max=int(g["L"].max()),
                   L2_term=f"not fitted: {len(stable)} stable lengths (4 needed)")
        if fit is not None:
            row.update(L2_term=fit["c_sign"] if fit["c_sign"] == "not resolved" else f"resolved {fit['c_sign']}",
                       L_star=fit["L_star"], c_s=fit["c"], c_ci95_low=fit["c_low"], c_ci95_high=fit["c_high"],
                       a_s=fit["a"], b_s=fit["b"])
        row.update(s_at_L_max=float(g.sort_values("L")["median_s"].iloc[-1]), threads=_threads(g),
                   unstable_left_out=len(g) - len(_stable(g)))
        out.append((key, stable, row))
    return out


def cumulative_table(data):
    """One row per cumulative series: the fitted a (s), b (s per token), c (s per token^2) with c's 95 %
    interval, whether the L^2 term is resolved (its interval excludes 0) and L_star, the length from
    which c L^2 is the larger part of t(L); L_star only where c is resolved positive."""
    return pd.DataFrame([row for _, _, row in _cumulative_fits(data)])


def _names(rows):
    """A name for each cumulative row: its level, with its impl where a mode has two series of that level,
    and its source where there are several."""
    sources = len({r["source"] for r in rows}) > 1
    out = []
    for r in rows:
        twins = sum(q["mode"] == r["mode"] and q["level"] == r["level"] and q["source"] == r["source"] for q in rows)
        out.append(str(r["level"]) + (f" / {r['impl']}" if twins > 1 else "") + (f" [{r['source']}]" if sources else ""))
    return out


def dominance(row):
    """Where a resolved positive L^2 term is the larger part of t(L), said within what was measured:
    'at every measured length', 'from L ≈ 94', or 'only past the measured lengths (L > 1,024)' (an
    L_star found by extrapolation is not quoted)."""
    if row["L_star"] < row["L_min"]:
        return "at every measured length"
    if row["L_star"] <= row["L_max"]:
        return f"from L ≈ {row['L_star']:,.0f}"
    return f"only past the measured lengths (L > {row['L_max']:,})"


def cumulative_title(rows):
    """What the fits of cumulative_table's rows show, a line per mode and finding: where the L^2 term is
    resolved and where it dominates, or that it is not resolved (or not fitted) at the measured lengths."""
    lines = ["generating L tokens, fitted t(L) = a + b·L + c·L² (c and its 95 % interval in the legend)"]
    names = _names(rows)
    for mode, shown in MODES.items():
        mine = [(n, r) for n, r in zip(names, rows) if r["mode"] == mode]
        if not mine:
            continue
        positive = [(n, r) for n, r in mine if r["L2_term"] == "resolved positive"]
        said = [(n, dominance(r)) for n, r in positive]
        within = [f"{d.removeprefix('from L ')} ({n})" for n, d in said if d.startswith("from L")]
        phrases = [f"resolved, dominant from L {', '.join(within)}"] if within else []
        for text in ("at every measured length", "only past the measured lengths"):
            hit = [n for n, d in said if d.startswith(text)]
            phrases += [f"resolved, dominant {text} ({', '.join(hit)})"] if hit else []
        for term, text in (("resolved negative", "resolved negative"), ("not resolved", "not resolved at these lengths")):
            hit = [n for n, r in mine if r["L2_term"] == term]
            phrases += [f"{text} ({', '.join(hit)})"] if hit else []
        unfitted = [n for n, r in mine if r["L2_term"].startswith("not fitted")]
        phrases += [f"not fitted, under 4 stable lengths ({', '.join(unfitted)})"] if unfitted else []
        lines += [f"{shown}: L² term {p}" for p in phrases]
    return "\n".join(lines)


def quadratic_label(row):
    """A legend label's fit: 'c = 2.8e-05 [1.7e-05, 4e-05] s/token², c·L² dominant from L ≈ 94', '... not
    resolved' or 'not fitted: ...'."""
    if "c_s" not in row or not np.isfinite(row["c_s"]):
        return row["L2_term"]
    c = f"c = {row['c_s']:.2g} [{row['c_ci95_low']:.2g}, {row['c_ci95_high']:.2g}] s/token²"
    if row["L2_term"] == "resolved positive":
        return f"{c}, c·L² dominant {dominance(row)}"
    return f"{c}, {row['L2_term']}"


def plot_cumulative(data, path):
    """Measured time to generate L tokens one after another, in both modes, each series labelled with its
    fitted L^2 term (cumulative_table); the title says what the fits show (cumulative_title)."""
    fits = _cumulative_fits(data)
    if not any(len(stable) for _, stable, _ in fits):
        return None
    fig, ax = plt.subplots(figsize=(9, 7.5))
    for key, stable, row in fits:
        label = " / ".join(dict.fromkeys(str(key[k]) for k in ("level", "impl", "mode") if k in key))  # once each
        if len({k.get("source") for k, _, _ in fits}) > 1:
            label += f" [{key['source']}]"
        ax.loglog(stable["L"], stable["median_s"], "-" if key.get("mode") == "recurrent" else "--", marker="o", ms=3,
                  label=f"{label} ({row['points']} points): {quadratic_label(row)}")
    _label_axes(ax, "tokens generated L", "time to generate L tokens (s)", cumulative_title([r for _, _, r in fits]))
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12))   # below the axes: the labels are long
    return _save(fig, path)


def memory_table(data):
    """Peak resident memory of recurrent decoding at several lengths: it should not grow with L."""
    rows = data[(data["benchmark"] == "time_per_token") & (data["kind"] == "memory")] if "kind" in data else data.iloc[:0]
    if rows.empty:
        return pd.DataFrame()
    cols = [c for c in ("source", "level", "impl", "L", "peak_rss_bytes", "rss_before_bytes", "per_token_mean_s") if c in rows]
    out = rows[cols].sort_values([c for c in ("source", "L") if c in cols]).reset_index(drop=True)
    out["peak_rss_mib"] = out.pop("peak_rss_bytes") / 2 ** 20
    out["before_mib"] = out.pop("rss_before_bytes") / 2 ** 20
    return out


def scan_grid_table(data):
    """Every implementation at each grid point: absolute ms (wall-clock median), its paired ratio to
    the floor with quartiles, and to the best peer, measured interleaved in one run."""
    rows = _rows(data, "scan_grid")
    if rows.empty or "impl" not in rows or "ratio" not in rows:
        return pd.DataFrame()
    rows = rows[(rows["impl"] != "floor") & rows["ratio"].notna()]
    floors = _rows(data, "scan_grid")
    floors = floors[floors["impl"] == "floor"]
    point = [k for k in ("source", "b", "d", "n", "l", "threads", "direction") if k in rows]
    floor_ms = {tuple(r[k] for k in point): 1e3 * r["median_s"] for _, r in floors.iterrows()}
    out = []
    for _, r in rows.iterrows():
        key = {k: r[k] for k in point}
        out.append(dict(source=r.get("source"), elements_per_step=int(r["b"] * r["d"] * r["n"]), l=int(r["l"]),
                        direction=r.get("direction", "forward"), threads=r.get("threads"), impl=r["impl"],
                        ms=1e3 * r["median_s"], floor_ms=floor_ms.get(tuple(key.values()), np.nan),
                        vs_floor=r["ratio"], vs_floor_q1=r["ratio_q1"], vs_floor_q3=r["ratio_q3"],
                        vs_best_peer=r.get("vs_best_peer", np.nan), best_peer=r.get("best_peer"),
                        unstable=bool(r.get("unstable", False))))
    out = pd.DataFrame(out)
    return out.sort_values(["source", "direction", "elements_per_step", "l", "impl"]).reset_index(drop=True)


def plot_scan_grid(table, path):
    """Ratio to the floor per grid point (sorted numerically), absolute ms written on each bar;
    unstable points are not drawn."""
    table = table[(table["direction"] == "forward") & ~table["unstable"]] if not table.empty else table
    if table.empty:
        return None
    table = table[table["source"] == table["source"].iloc[0]]
    points = sorted({(int(e), int(l)) for e, l in zip(table["elements_per_step"], table["l"])})
    names = sorted(table["impl"].unique())
    fig, ax = plt.subplots(figsize=(9, 5))
    width = 0.8 / len(names)
    for i, impl in enumerate(names):
        part = table[table["impl"] == impl].set_index(["elements_per_step", "l"])
        xs, ys, ms = [], [], []
        for j, p in enumerate(points):
            if p in part.index:
                xs.append(j + (i - (len(names) - 1) / 2) * width)
                ys.append(float(part.loc[p, "vs_floor"]))
                ms.append(float(part.loc[p, "ms"]))
        bars = ax.bar(xs, ys, width, label=impl)
        for bar, m in zip(bars, ms):
            ax.annotate(f"{m:.3g} ms" if m < 100 else f"{m:,.0f} ms", (bar.get_x() + bar.get_width() / 2, bar.get_height()), rotation=90,
                        fontsize=6, ha="center", va="bottom", xytext=(0, 2), textcoords="offset points")
    ax.set_yscale("log")
    low, high = ax.get_ylim()
    ax.set_ylim(min(low, 0.5), high * 3)  # room for the ms labels, and the floor's line in view
    ax.set_xticks(range(len(points)), [f"{e:,} × {l:,}" for e, l in points], rotation=20)
    ax.axhline(1, color="k", lw=0.8)
    _label_axes(ax, "elements per step (b·d·n) × sequence length l", "time / floor (paired, median of rounds)",
                f"scan forward, float32, {_threads(table)} thread(s): ratio to the floor (ms on each bar)")
    return _save(fig, path)


def peers_table(data):
    """Decoding and prefill against mamba.py, measured interleaved (paired ratio per round, then quartiles)."""
    rows = _rows(data, "time_per_token")
    if rows.empty or "ratio_to" not in rows:
        return pd.DataFrame()
    rows = rows[rows["ratio_to"] == "mambapy"]
    cols = [c for c in ("source", "kind", "level", "impl", "L", "threads", "median_s", "ratio", "ratio_q1",
                        "ratio_q3", "unstable", "speedup_over_mambapy", "same_next_tokens") if c in rows]
    out = rows[cols].sort_values([c for c in ("source", "kind", "level", "L") if c in cols]).reset_index(drop=True)
    return out.rename(columns={"ratio": "ratio_to_mambapy", "median_s": "cpu_s"})


def ssd_grid_table(data, benchmark="ssd_grid"):
    """The SSD benchmark (benchmarks/ssd_grid.py), or Mamba-3's (benchmarks/mamba3_grid.py, which
    adds chunked / floor and chunked's time per token / one step): one row per implementation at each
    point, its per-round ratio to chunked (interleaved), the floor's rate, (f+b)/f, and the memory point."""
    rows = data[data["benchmark"] == benchmark] if "benchmark" in data else data.iloc[:0]
    out = []
    for _, r in rows.iterrows():
        for impl, m in (r.get("results") if isinstance(r.get("results"), dict) else {}).items():
            fb = m.get("forward_backward_over_forward") or {}
            out.append(dict(source=r.get("source"), l=r["l"], chunk_size=r["chunk_size"], direction=r["direction"],
                            threads=r.get("threads"), impl=impl, ms=1e3 * m["median_s"], ratio_to_chunked=m.get("ratio"),
                            ratio_q1=m.get("ratio_q1"), ratio_q3=m.get("ratio_q3"), unstable=m.get("unstable"),
                            gflop_per_s=m.get("gflop_per_s"), fb_over_f=fb.get("ratio"),
                            **({k: (m.get(k) or {}).get("ratio") for k in ("over_floor", "per_token_over_step")}
                               if benchmark == "mamba3_grid" else {}),
                            beyond_io_mib=(m["beyond_inputs_and_output_bytes"] / 2 ** 20
                                           if "beyond_inputs_and_output_bytes" in m else None),
                            beyond_in_chunks=m.get("beyond_in_chunks")))
    return pd.DataFrame(out)


def decode_split_table(data):
    """Where a decoding step's time goes, per part, as a share of the step."""
    rows = data[data["benchmark"] == "decode_split"]
    if "kind" in rows:
        rows = rows[rows["kind"] != "skipped"]
    if rows.empty:
        return pd.DataFrame()
    shares = [c for c in rows if c.startswith("share_")]
    cols = [c for c in ("source", "level", "impl", "threads", "total_s") if c in rows] + shares
    return rows[cols].rename(columns={c: c[len("share_"):] for c in shares}).reset_index(drop=True)


def accuracy_table(data):
    """Per implementation, dtype, regime and variant (plain; grouped B/C with an initial_state)."""
    rows = _rows(data, "accuracy")
    if rows.empty or "y_error" not in rows:
        return pd.DataFrame()
    rows = rows[rows["y_error"].notna()]
    cols = [c for c in ("source", "impl", "dtype", "regime", "variant", "g", "initial_state", "l") if c in rows]
    out = rows[cols].copy()
    out["y_error_rel"] = rows["y_error"] / rows["y_scale"].where(rows["y_scale"] > 0, 1)
    out["y_error_vs_loop"] = rows["y_error"] / rows["y_loop_error"].where(rows["y_loop_error"] > 0, np.nan)
    out["y_error_vs_bound"] = rows["y_error"] / rows["y_bound"]
    out["state_error_vs_bound"] = rows["state_error"] / rows["state_bound"]
    out["within_policy"] = rows["within_policy"].astype(bool)
    return out.sort_values(cols).reset_index(drop=True)


def accuracy_summary(table):
    """One line per implementation: cases within the policy, and the failing ones named."""
    if table.empty:
        return pd.DataFrame()
    out = []
    for (source, impl), g in table.groupby(["source", "impl"]):
        bad = g[~g["within_policy"]]
        out.append(dict(source=source, impl=impl, cases=len(g), within_policy=int(g["within_policy"].sum()),
                        verdict="within policy everywhere" if bad.empty else "FAILS the policy",
                        failing=", ".join(sorted({f"{r['dtype']} {r['variant']}" for _, r in bad.iterrows()}))))
    return pd.DataFrame(out)


def sources_table(data):
    """One row per source: where, with what, thread counts of its points, and the load while measured."""
    out = []
    for source, g in data.groupby("source"):
        m = next((x for x in g.get("machine", []) if isinstance(x, dict)), {})
        threads = g["threads"].dropna().astype(int).value_counts().sort_index() if "threads" in g else pd.Series(dtype=int)
        loads = g["load_avg"].dropna() if "load_avg" in g else pd.Series(dtype=float)
        out.append(dict(source=source, points=len(g), host=m.get("host"), cpus=m.get("cpus"),
                        threads_of_points=", ".join(f"{t} thread(s): {n}" for t, n in threads.items()) or None,
                        load_avg=f"{loads.min():.1f}-{loads.max():.1f}" if len(loads) else None,
                        torch=m.get("torch"), triton=m.get("triton"), gpu=m.get("cuda"),
                        commit=g["commit"].dropna().iloc[0] if "commit" in g and g["commit"].notna().any() else m.get("commit")))
    return pd.DataFrame(out)


def left_out(data, benchmark):
    """Implementations a sweep left out of a section, with the reason ("skipped" records)."""
    rows = data[(data["benchmark"] == benchmark)]
    if "kind" not in rows or "reason" not in rows:
        return []
    rows = rows[rows["kind"] == "skipped"]
    return sorted({f"{r['impl']}" + (f" ({r['variant']})" if isinstance(r.get("variant"), str) else "") + f": {r['reason']}"
                   for _, r in rows.iterrows()})


# The targets docs/figures.md states, checked against what was measured here.
TARGETS = (
    ("recurrent decoding is flat per token: slope <= 0.1, scan level", "slope", "scan", 0.1),
    ("recurrent decoding is flat per token: slope <= 0.1, model level", "slope", "model", 0.1),
    ("re-forwarding at L = 8192 costs >= 1000x a recurrent step (scan level, parallel)", "reforward", 8192, 1000),
    ("decoding per token <= 0.7x mamba.py's step, 130m configuration", "peer", "model_130m", 0.7),
    ("decoding per token <= 0.5x mamba.py's step, small configuration", "peer", "model_small", 0.5),
)


def targets_table(data, slopes):
    out = []
    for text, what, where, bound in TARGETS:
        measured, status = "–", "not measured"
        if what == "slope" and not slopes.empty:
            s = slopes[(slopes["level"] == where) & (slopes["mode"] == "recurrent") & (slopes["impl"] == "recurrent")]
            if not s.empty:
                r = s.iloc[0]
                measured = (f"{r['slope']:.2f} ± {r['ci95']:.2f} (L {r['L_min']}..{r['L_max']})" if r["fit"] == "fitted"
                            else f"{r['fit']} (L {r['L_min']}..{r['L_max']})")
                status = "not resolved" if not r["resolved"] else ("met" if r["slope"] <= bound else "NOT met")
        elif what == "reforward":
            rows = _rows(data, "time_per_token", "per_token")
            if "ratio" in rows:
                rows = rows[(rows["level"] == "scan") & (rows["mode"] == "reforward") & (rows["impl"] == "parallel")
                            & (rows["L"] == where) & rows["ratio"].notna()]
                if not rows.empty:
                    r = rows.iloc[0]
                    measured = f"{r['ratio']:,.0f}x [{r['ratio_q1']:,.0f}, {r['ratio_q3']:,.0f}]"
                    status = "unstable" if r.get("unstable") else ("met" if r["ratio"] >= bound else "NOT met")
            if measured == "–":
                status = "not measured (needs L = 8192: the default sweep)"
        elif what == "peer":
            rows = peers_table(data)
            if not rows.empty:
                rows = rows[(rows["level"] == where) & (rows["kind"] == "per_token") & (rows["impl"] == "recurrent")]
            if not rows.empty:
                worst = rows["ratio_to_mambapy"].max()
                measured = f"{rows['ratio_to_mambapy'].min():.2f}-{worst:.2f}x over L = {', '.join(str(int(L)) for L in rows['L'])}"
                status = ("unstable" if rows["unstable"].fillna(False).astype(bool).any()
                          else "met" if worst <= bound else "NOT met")
        out.append(dict(target=text, measured=measured, status=status))
    return pd.DataFrame(out)


def _integers(df):
    """Whole-number columns that a missing value turned into floats, shown as integers again."""
    df = df.copy()
    for c in df.select_dtypes("float"):
        values = df[c].dropna()
        if len(values) and (values == values.round()).all() and values.abs().max() < 2 ** 53:
            df[c] = df[c].astype("Int64")
    return df


def _md(df):
    if df.empty:
        return "_no data_"
    df = _integers(df)
    df = df.astype(object).where(df.notna(), None)   # tabulate's missingval replaces None, not NaN
    return df.to_markdown(index=False, floatfmt=".3g", missingval="–")


def _html(df):
    return (_integers(df).to_html(index=False, float_format=lambda x: f"{x:.3g}", border=0, na_rep="–")
            if not df.empty else "<p><em>no data</em></p>")


MISSING = {  # what a "–" (a missing value) means in each table
    "Scan speed grid": "vs_best_peer: the implementation is itself the only peer measured at that point; "
                       "floor_ms: no floor in that run.",
    "Accuracy against the float64 loop": "y_error_vs_loop: the loop's own error in that dtype is 0 (float64 "
                                         "inputs, where the loop is the oracle), so no multiple of it exists.",
    "Against mamba.py: decoding and prefill": "speedup_over_mambapy and same_next_tokens are for prefill rows only.",
    "Time per token": "ci95: two lengths only, no interval.",
    "Cumulative generation time": "L_star: c is not resolved positive; c_s to b_s: not fitted "
                                  "(under 4 stable lengths).",
}


def build(data, problems, out_dir):
    """Write report.md, report.html and the PNGs into out_dir; returns the two report paths."""
    os.makedirs(out_dir, exist_ok=True)
    grid = scan_grid_table(data)
    slopes = slope_table(data)
    accuracy = accuracy_table(data)
    per_level = plot_time_per_token(data, out_dir)
    figures = dict(cumulative=plot_cumulative(data, os.path.join(out_dir, "cumulative.png")),
                   scan_grid=plot_scan_grid(grid, os.path.join(out_dir, "scan_grid.png")))
    bench = _rows(data, "pytest-benchmark")
    bench = bench[[c for c in ("source", "group", "name", "median_s", "iqr_s", "runs") if c in bench]]
    sections = [
        ("Where these results come from", sources_table(data), [], [],
         "One row per result file (shard files of one commit are one source); compare rows measured on the same "
         "machine and commit only. threads_of_points counts the points measured with each torch thread count; "
         "load_avg is the 1-minute load average while they were measured (2 cores: above 2 the machine was busy)."),
        ("Targets (docs/figures.md)", targets_table(data, slopes), [], [],
         "Each target against this run: met, NOT met, not resolved (a slope whose 95 % interval is wider than "
         f"±{SLOPE_RESOLVED}), unstable (a paired ratio too noisy to conclude) or not measured by this sweep."),
        ("Time per token", slopes, list(per_level.values()), left_out(data, "time_per_token"),
         "Re-forwarding the whole prefix costs time proportional to L per token (slope ≈ 1, quadratic in total); "
         "recurrent decoding with a kept state costs the same at every position (slope ≈ 0). Slopes are log-log "
         "least-squares fits of the median CPU time per token (1 thread; medians over interleaved rounds), with "
         f"95 % half-widths; wider than ±{SLOPE_RESOLVED} is shown as not resolved. Points whose paired ratio is "
         "unstable are left out of fits and figures (unstable_left_out)."),
        ("Re-forwarding against a recurrent step", reforward_table(data), [], [],
         "The time to re-run the whole prefix for one token, as a multiple of one recurrent step at the same L "
         "(reforward_over_step: median of per-round CPU-time ratios, with quartiles, measured interleaved)."),
        ("Cumulative generation time", cumulative_table(data), [figures["cumulative"]] if figures["cumulative"] else [],
         [], "Measured time to generate L tokens one after another (generate, from a one-token prompt) in both "
             "modes, for each family's small model (level model: MambaLM, model2: Mamba2LM, model3: Mamba3LM). "
             "Each series is fitted with t(L) = a + b·L + c·L² (weighted least squares on relative residuals, "
             "scipy's curve_fit; unstable points left out): a fixed cost, a cost per token, and a cost per token "
             "that grows with the prefix. c is resolved when its 95 % interval (Student's t, n − 3 degrees of "
             "freedom) excludes 0; L_star is the length from which c·L² is the larger part of t(L) "
             "(c·L² > a + b·L). Re-forwarding runs a forward over the whole prefix for every token, so c > 0; "
             "recurrent decoding costs the same at every position, so c should be consistent with 0. A log-log "
             "slope of these totals reads below 2 (re-forward) and 1 (recurrent) wherever the fixed cost a is "
             "much of the time, so none is drawn, and the figure's title states only what these fits show."),
        ("Memory of recurrent decoding", memory_table(data), [], [],
         "Peak resident memory of a process decoding L tokens: a kept state takes constant memory."),
        ("Scan speed grid", grid, [figures["scan_grid"]] if figures["scan_grid"] else [], left_out(data, "scan_grid"),
         "Forward scans against the floor, each implementation measured interleaved with it in one run (ratio: "
         "median of per-round CPU-time ratios, with quartiles). The floor is one exp(dt ⊗ A) pass over all b·d·l·n "
         "elements, in place into a buffer allocated outside the timed call (an allocating floor measured page "
         "faults). It is a unit of work, not a bound: it writes every element to memory, which a scan that streams "
         "through cache (parallel) never does, so a ratio below 1 is possible. vs_best_peer: per-round ratio to "
         "the faster of loop and mamba.py's pscan. ms and floor_ms are absolute CPU ms. Unstable points are not drawn."),
        ("SSD scan grid (Mamba-2)", ssd_grid_table(data), [], [],
         "benchmarks/ssd_grid.py at mamba2-130m's layer (b=1, h=24, p=64, n=128, g=1): chunked, the loop, the mapped "
         "parallel, transformers' torch SSD and the floor (the chunked algorithm's four batched matmuls on the same "
         "shapes, by torch.matmul), measured interleaved; ratio_to_chunked is the median of per-round wall-clock "
         "ratios, with quartiles; fb_over_f is chunked's forward+backward over its forward; the memory point gives "
         "the peak resident memory beyond the inputs and the output, in MiB and in chunks' worth."),
        ("Mamba-3 scan grid (SISO)", ssd_grid_table(data, "mamba3_grid"), [], [],
         "benchmarks/mamba3_grid.py at the official kernel's optimum shape (b=1, h_qk=1, h=32, n=128, p=64, "
         "n_ang=32, chunk_size 64), float32, one thread: chunked, the loop, the step run per token (recurrent), one "
         "step, and the floor (the chunked algorithm's four batched matmuls), measured interleaved; over_floor is "
         "chunked / floor and per_token_over_step chunked's time per token / one step, both per-round medians; "
         "the memory points give the memory beyond inputs and output at several l."),
        ("Against mamba.py: decoding and prefill", peers_table(data), [], [],
         "Our MambaLM against mamba.py's Mamba loaded with the same weights (impls/adapters/mambapy_model.py), measured "
         "interleaved in one run: per-token decoding (ratio < 1 means ours is faster) and prompt prefill into the "
         "decode cache (one parallel scan against mamba.py's token-by-token loop of step), with the next greedy "
         "tokens from both caches compared."),
        ("Where a decoding step's time goes", decode_split_table(data), [], left_out(data, "decode_split"),
         "Each part's share of one MambaLM.step, timed inside the real step (benchmarks/decode_split.py)."),
        ("Accuracy: verdict per implementation", accuracy_summary(accuracy), [], left_out(data, "accuracy"),
         "Over every dtype the implementation declares, every input regime, and both variants: plain B/C, and "
         "grouped B/C (g > 1, several channels per group) with an initial_state. A kernel the suite fails fails here."),
        ("Accuracy against the float64 loop", accuracy, [], [],
         "Largest error of y relative to the oracle's scale, as a multiple of the loop's own error in the same "
         "dtype, and as a fraction of the tolerance policy's bound (within policy: at most 1 for y and last_state)."),
        ("pytest-benchmark timings", bench.reset_index(drop=True), [], [], "From --benchmark-json files."),
    ]
    md = ["# Selective-scan benchmark report", ""]
    body = []
    if problems:
        md += ["## Skipped or failed results", ""] + [f"- {p}" for p in problems] + [""]
        body.append("<h2>Skipped or failed results</h2><ul>" + "".join(f"<li>{html.escape(p)}</li>" for p in problems) + "</ul>")
    for title, table, pngs, gone, text in sections:
        if table.empty and not pngs:
            continue
        md += [f"## {title}", "", text, ""]
        body.append(f"<h2>{html.escape(title)}</h2><p>{html.escape(text)}</p>")
        if gone:
            md += ["Left out of this section:", ""] + [f"- {g}" for g in gone] + [""]
            body.append("<p>Left out of this section:</p><ul>" + "".join(f"<li>{html.escape(g)}</li>" for g in gone) + "</ul>")
        for png in pngs:
            md += [f"![{title}]({os.path.basename(png)})", ""]
            body.append(f'<img src="{os.path.basename(png)}" alt="{html.escape(title)}" style="max-width:100%">')
        if not table.empty:
            md += [_md(table), ""]
            body.append(_html(table))
            if title in MISSING and table.isna().any().any():
                md += [f"– (a missing value): {MISSING[title]}", ""]
                body.append(f"<p>– (a missing value): {html.escape(MISSING[title])}</p>")
    md_path, html_path = os.path.join(out_dir, "report.md"), os.path.join(out_dir, "report.html")
    with open(md_path, "w") as f:
        f.write("\n".join(md))
    with open(html_path, "w") as f:
        f.write("<!doctype html><html><head><meta charset='utf-8'><title>Selective-scan benchmark report</title>"
                "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse;font-size:13px}"
                "td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:right}</style></head><body>"
                "<h1>Selective-scan benchmark report</h1>" + "\n".join(body) + "</body></html>")
    return md_path, html_path
