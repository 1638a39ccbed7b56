"""Turn loaded results (reports/load.py) into report.md and report.html with PNG plots.

Sections, each present only when its data is: where the results come from and what could not be
read; time per token against prefix length on log-log axes with fitted slopes; cumulative
generation time; the scan speed grid as ratios to the floor and to the best peer; accuracy against
the float64 loop; pytest-benchmark timings.
"""

import html
import os

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from benchmarks.slopes import fit_slope  # noqa: E402

PEERS = ("loop", "mambapy")        # the best of these is the scan grid's peer
FLOORS = ("floor", "floor_inplace")


def _rows(data, benchmark, kind=None):
    """The timed rows of one benchmark (and, for time_per_token, one kind of point)."""
    rows = data[data["benchmark"] == benchmark]
    if kind is not None:
        rows = rows[rows["kind"] == kind] if "kind" in rows else rows.iloc[:0]
    rows = rows.dropna(axis=1, how="all")
    return rows if "median_s" not in rows else rows[rows["median_s"].notna()]


def _series(rows, keys):
    """Group rows into series by ``keys`` (ignoring keys not present), each sorted by L."""
    keys = [k for k in keys if k in rows]
    for name, group in rows.groupby(keys, dropna=False):
        yield dict(zip(keys, name if isinstance(name, tuple) else (name,))), group.sort_values("L")


def slope_table(data):
    """Fitted log-log slope of time per token against L for every series."""
    rows = _rows(data, "time_per_token", "per_token")
    out = []
    if rows.empty:
        return pd.DataFrame()
    for key, g in _series(rows, ["source", "level", "impl", "mode"]):
        g = g.groupby("L", as_index=False)["median_s"].median()
        if len(g) < 3:
            continue
        fit = fit_slope(g["L"].to_numpy(), g["median_s"].to_numpy())
        out.append(dict(key, slope=fit["slope"], ci95=(fit["ci_high"] - fit["ci_low"]) / 2, L_min=int(g["L"].min()), L_max=int(g["L"].max()),
                        ms_per_token_at_L_max=1e3 * float(g["median_s"].iloc[-1])))
    return pd.DataFrame(out)


def _label_axes(ax, xlabel, ylabel, title):
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def _save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_time_per_token(data, path):
    rows = _rows(data, "time_per_token", "per_token")
    if rows.empty:
        return None
    levels = sorted(rows["level"].dropna().unique()) if "level" in rows else [None]
    fig, axes = plt.subplots(1, len(levels), figsize=(6.5 * len(levels), 4.8), squeeze=False)
    for ax, level in zip(axes[0], levels):
        part = rows if level is None else rows[rows["level"] == level]
        for key, g in _series(part, ["source", "impl", "mode"]):
            g = g.groupby("L", as_index=False)["median_s"].median()
            style = "-" if key.get("mode") == "recurrent" else "--"
            label = " / ".join(str(key[k]) for k in ("impl", "mode") if k in key)
            if part["source"].nunique() > 1:
                label += f" [{key['source']}]"
            line, = ax.loglog(g["L"], g["median_s"] * 1e3, style, marker="o", ms=3, label=label)
            if len(g) >= 3:
                fit = fit_slope(g["L"].to_numpy(), g["median_s"].to_numpy())
                ax.annotate(f"slope {fit['slope']:.2f}", (g["L"].iloc[-1], g["median_s"].iloc[-1] * 1e3),
                            textcoords="offset points", xytext=(4, 0), fontsize=7, color=line.get_color())
        _label_axes(ax, "prefix length L (tokens)", "time per generated token (ms)",
                    f"time per token, {level} level: re-forward (dashed) vs recurrent (solid)")
    return _save(fig, path)


def plot_cumulative(data, path):
    """Measured time to generate L tokens one after another, in both modes."""
    rows = _rows(data, "time_per_token", "cumulative")
    if rows.empty:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    for key, g in _series(rows, ["source", "level", "impl", "mode"]):
        g = g.groupby("L", as_index=False)["median_s"].median()
        label = " / ".join(str(key[k]) for k in ("level", "impl", "mode") if k in key)
        ax.loglog(g["L"], g["median_s"], "-" if key.get("mode") == "recurrent" else "--", marker="o", ms=3, label=label)
    _label_axes(ax, "tokens generated L", "time to generate L tokens (s)",
                "cumulative time: quadratic (re-forward) vs linear (recurrent)")
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
    """Every implementation's median at each grid point, as a ratio to the floor and to the best peer."""
    rows = _rows(data, "scan_grid")
    if rows.empty or "impl" not in rows:
        return pd.DataFrame()
    point = [k for k in ("source", "b", "d", "n", "l", "dtype", "threads", "direction") if k in rows]
    med = rows.groupby(point + ["impl"], dropna=False)["median_s"].median().unstack("impl")
    out = []
    for idx, r in med.iterrows():
        key = dict(zip(point, idx if isinstance(idx, tuple) else (idx,)))
        peers = [r[p] for p in PEERS if p in r and pd.notna(r[p])]
        for impl, t in r.items():
            if pd.isna(t) or impl in FLOORS:
                continue
            out.append(dict(key, elements_per_step=int(key.get("b", 1) * key.get("d", 1) * key.get("n", 1)), impl=impl,
                            ms=1e3 * t,
                            vs_floor=t / r["floor"] if "floor" in r and pd.notna(r["floor"]) else np.nan,
                            vs_inplace_floor=t / r["floor_inplace"] if "floor_inplace" in r and pd.notna(r["floor_inplace"]) else np.nan,
                            vs_best_peer=t / min(peers) if peers else np.nan))
    return pd.DataFrame(out)


def plot_scan_grid(table, path):
    if table.empty:
        return None
    fig, ax = plt.subplots(figsize=(9, 4.8))
    table = table.assign(point=table["elements_per_step"].astype(str) + " x " + table["l"].astype(str))
    pivot = table.pivot_table(index="point", columns="impl", values="vs_floor", aggfunc="median")
    pivot.plot.bar(ax=ax, logy=True, rot=30)
    ax.axhline(1, color="k", lw=0.8)
    _label_axes(ax, "elements per step (b·d·n) x sequence length l", "time / floor (one exp(dt ⊗ A) pass)",
                "scan forward, float32: ratio to the floor (lower is better)")
    return _save(fig, path)


def peers_table(data):
    """Decoding and prefill against mamba.py, measured side by side (ratios per round, then quartiles)."""
    rows = data[(data["benchmark"] == "time_per_token") & data.get("ratio_to_mambapy", pd.Series(index=data.index)).notna()]
    if rows.empty:
        return pd.DataFrame()
    cols = [c for c in ("source", "kind", "level", "impl", "L", "threads", "median_s", "ratio_to_mambapy", "ratio_q1",
                        "ratio_q3", "speedup_over_mambapy", "same_next_tokens") if c in rows]
    return rows[cols].sort_values([c for c in ("source", "kind", "level", "L") if c in cols]).reset_index(drop=True)


def decode_split_table(data):
    """Where a decoding step's time goes, per part, as a share of the step."""
    rows = data[data["benchmark"] == "decode_split"]
    if rows.empty:
        return pd.DataFrame()
    shares = [c for c in rows if c.startswith("share_")]
    cols = [c for c in ("source", "level", "impl", "total_s") if c in rows] + shares
    return rows[cols].rename(columns={c: c[len("share_"):] for c in shares}).reset_index(drop=True)


def accuracy_table(data):
    rows = _rows(data, "accuracy")
    if rows.empty:
        return pd.DataFrame()
    cols = [c for c in ("source", "impl", "dtype", "regime", "l") if c in rows]
    out = rows[cols].copy()
    out["y_error_rel"] = rows["y_error"] / rows["y_scale"].where(rows["y_scale"] > 0, 1)
    out["y_error_vs_loop"] = rows["y_error"] / rows["y_loop_error"].where(rows["y_loop_error"] > 0, np.nan)
    out["state_error"] = rows["state_error"]
    out["within_policy"] = rows["within_policy"]
    return out.sort_values(cols).reset_index(drop=True)


def sources_table(data):
    out = []
    for source, g in data.groupby("source"):
        m = next((x for x in g.get("machine", []) if isinstance(x, dict)), {})
        out.append(dict(source=source, points=len(g), host=m.get("host"), cpus=m.get("cpus"), threads=m.get("threads"),
                        torch=m.get("torch"), triton=m.get("triton"), gpu=m.get("cuda"), commit=m.get("commit")))
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
    return _integers(df).to_markdown(index=False, floatfmt=".3g") if not df.empty else "_no data_"


def _html(df):
    return (_integers(df).to_html(index=False, float_format=lambda x: f"{x:.3g}", border=0) if not df.empty
            else "<p><em>no data</em></p>")


def build(data, problems, out_dir):
    """Write report.md, report.html and the PNGs into out_dir; returns the two report paths."""
    os.makedirs(out_dir, exist_ok=True)
    grid = scan_grid_table(data)
    figures = dict(
        time_per_token=plot_time_per_token(data, os.path.join(out_dir, "time_per_token.png")),
        cumulative=plot_cumulative(data, os.path.join(out_dir, "cumulative.png")),
        scan_grid=plot_scan_grid(grid, os.path.join(out_dir, "scan_grid.png")),
    )
    bench = _rows(data, "pytest-benchmark")
    bench = bench[[c for c in ("source", "group", "name", "median_s", "iqr_s", "runs") if c in bench]]
    sections = [
        ("Where these results come from", sources_table(data), None,
         "One row per result file; compare rows measured on the same machine and commit only."),
        ("Time per token", slope_table(data), "time_per_token",
         "Re-forwarding the whole prefix costs time proportional to L per token (slope ≈ 1, quadratic in total); "
         "recurrent decoding with a kept state costs the same at every position (slope ≈ 0). Slopes are log-log "
         "least-squares fits of the median time per token, with 95 % confidence half-widths."),
        ("Cumulative generation time", pd.DataFrame(), "cumulative",
         "Measured time to generate L tokens one after another (MambaLM.generate) in both modes."),
        ("Memory of recurrent decoding", memory_table(data), None,
         "Peak resident memory of a process decoding L tokens: a kept state takes constant memory."),
        ("Scan speed grid", grid, "scan_grid",
         "Forward scan medians as ratios to the floor (one allocating exp(dt ⊗ A) pass over all b·d·l·n elements, "
         "which no scan can beat) and to the best pure-PyTorch peer (the faster of loop and mamba.py's pscan)."),
        ("Against mamba.py: decoding and prefill", peers_table(data), None,
         "Our MambaLM against mamba.py's Mamba loaded with the same weights (impls/mambapy_model.py), measured "
         "side by side in one run: per-token decoding (ratio < 1 means ours is faster) and prompt prefill into the "
         "decode cache (one parallel scan against mamba.py's token-by-token loop of step), with the next greedy "
         "tokens from both caches compared."),
        ("Where a decoding step's time goes", decode_split_table(data), None,
         "Each part's share of one MambaLM.step, timed inside the real step (benchmarks/decode_split.py)."),
        ("Accuracy against the float64 loop", accuracy_table(data), None,
         "Largest error of y relative to the oracle's scale, and as a multiple of the loop's own error in the same "
         "dtype (the tolerance policy allows 2x plus a rounding floor)."),
        ("pytest-benchmark timings", bench.reset_index(drop=True), None, "From --benchmark-json files."),
    ]
    md = ["# Selective-scan benchmark report", ""]
    body = []
    if problems:
        md += ["## Skipped or failed results", ""] + [f"- {p}" for p in problems] + [""]
        body.append("<h2>Skipped or failed results</h2><ul>" + "".join(f"<li>{html.escape(p)}</li>" for p in problems) + "</ul>")
    for title, table, figure, text in sections:
        png = figures.get(figure) if figure else None
        if table.empty and not png:
            continue
        md += [f"## {title}", "", text, ""]
        body.append(f"<h2>{html.escape(title)}</h2><p>{html.escape(text)}</p>")
        if png:
            md += [f"![{title}]({os.path.basename(png)})", ""]
            body.append(f'<img src="{os.path.basename(png)}" alt="{html.escape(title)}" style="max-width:100%">')
        if not table.empty:
            md += [_md(table), ""]
            body.append(_html(table))
    md_path, html_path = os.path.join(out_dir, "report.md"), os.path.join(out_dir, "report.html")
    with open(md_path, "w") as f:
        f.write("\n".join(md))
    with open(html_path, "w") as f:
        f.write("<!doctype html><html><head><meta charset='utf-8'><title>Selective-scan benchmark report</title>"
                "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse;font-size:13px}"
                "td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:right}</style></head><body>"
                "<h1>Selective-scan benchmark report</h1>" + "\n".join(body) + "</body></html>")
    return md_path, html_path
