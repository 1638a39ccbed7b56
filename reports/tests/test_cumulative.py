"""The cumulative figure says what its fits show: t(L) = a + b L + c L^2 on series with known terms."""

import re

import numpy as np
import pytest
from matplotlib.figure import Figure

from benchmarks import runner
from benchmarks.common import append_jsonl
from reports import report
from reports.load import load

# re-forward series: the generating (a s, b s per token, c s per token^2), exact, at L = 8 ... 256
REFORWARD = {"model": (5e-3, 5e-5, 1e-6), "model3": (5e-3, 5e-4, 1e-6), "model4": (1e-5, 1e-7, 1e-5)}
# where c L^2 = a + b L, by hand: model 1e-6 * 100^2 = 5e-3 + 5e-5 * 100; model3 (b + sqrt(b^2 + 4ac)) / 2c
# = (5e-4 + 5.196e-4) / 2e-6 = 509.8, past the longest length measured; model4 by the same formula
# (1e-7 + 2.00002e-5) / 2e-5 = 1.005, before the shortest
L_STAR = {"model": 100, "model3": 510, "model4": 1}
RECURRENT = (4e-3, 3e-4)            # a + b L with 5 % noise: c = 0
NOISE_SEED = 0                      # a draw in which all three intervals hold c = 0, as 95 % of draws each do
IMPL = {"model": "parallel", "model2": "chunked", "model3": "chunked"}
OLD_TITLE = "cumulative time: quadratic (re-forward, slope 2) vs linear (recurrent, slope 1)"

# what the title must say of each series, from the generating terms
TRUTH = {("re-forward", "model"): ("dominant", L_STAR["model"]),
         ("re-forward", "model3"): ("past", None),             # an extrapolated L is not quoted
         ("re-forward", "model4"): ("everywhere", None),
         ("re-forward", "model2"): ("not fitted", None),       # three lengths only
         **{("recurrent", level): ("not resolved", None) for level in IMPL}}


def write(path):
    rng = np.random.default_rng(NOISE_SEED)

    def record(level, mode, L, t):
        point = dict(kind="cumulative", level=level, mode=mode, impl="recurrent" if mode == "recurrent" else IMPL.get(level, "chunked"),
                     L=int(L), threads=1)
        append_jsonl(path, dict(benchmark="time_per_token", key=runner.point_key("time_per_token", point),
                                commit="abc1234", median_s=float(t), **point))

    L = 2 ** np.arange(3, 9)
    for level, (a, b, c) in REFORWARD.items():
        for x in L:
            record(level, "reforward", x, a + b * x + c * x * x)
    for x in L[:3]:
        record("model2", "reforward", x, 1e-3 * x * x)
    for level in IMPL:
        for x in 2 ** np.arange(3, 11):
            record(level, "recurrent", x, (RECURRENT[0] + RECURRENT[1] * x) * np.exp(rng.normal(0, 0.05)))


def claims(title):
    """{(mode as shown, series name): (what the title says of its L^2 term, the L it names or None)}."""
    out = {}
    for line in title.splitlines():
        mode, found, rest = line.partition(": L² term ")
        if not found:
            continue
        for phrase in rest.split("; "):
            if phrase.startswith("resolved, dominant from"):
                for L, name in re.findall(r"≈ ([\d,]+) \(([^)]+)\)", phrase):
                    out[(mode, name)] = ("dominant", int(L.replace(",", "")))
                continue
            if phrase.startswith("resolved, dominant"):
                status = "past" if "past the measured lengths" in phrase else "everywhere"
                for name in re.search(r"\(([^)]+)\)$", phrase).group(1).split(", "):
                    out[(mode, name)] = (status, None)
                continue
            m = re.fullmatch(r"(resolved negative|not resolved|not fitted)[^(]*\((.+)\)", phrase)
            for name in (m.group(2).split(", ") if m else [phrase]):
                out[(mode, name)] = (m.group(1) if m else "unreadable", None)
    return out


def from_fits(table):
    """What the title must say, from cumulative_table's fits."""
    out = {}
    for _, r in table.iterrows():
        if r["L2_term"] == "resolved positive":
            said = (("everywhere", None) if r["L_star"] < r["L_min"] else ("past", None) if r["L_star"] > r["L_max"]
                    else ("dominant", round(r["L_star"])))
        else:
            said = (next(s for s in ("resolved negative", "not resolved", "not fitted") if r["L2_term"].startswith(s)), None)
        out[(report.MODES[r["mode"]], r["level"])] = said
    return out


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "cumulative.jsonl"
    write(path)
    data, problems = load([str(path)])
    assert not problems
    return data


@pytest.fixture
def drawn(monkeypatch):
    """The title and legend labels of the figures drawn, as the figure holds them when saved."""
    out = {}
    save = Figure.savefig

    def keep(fig, *args, **kwargs):
        ax = fig.axes[0]
        out.update(title=ax.get_title(), labels=[t.get_text() for t in ax.get_legend().get_texts()])
        return save(fig, *args, **kwargs)
    monkeypatch.setattr(Figure, "savefig", keep)
    return out


def test_fits_recover_the_generating_terms(data):
    table = report.cumulative_table(data).set_index(["level", "mode"])
    for level, (a, b, c) in REFORWARD.items():
        r = table.loc[(level, "reforward")]
        assert (r["a_s"], r["b_s"], r["c_s"]) == pytest.approx((a, b, c), rel=1e-6)
        assert r["c_ci95_low"] <= c <= r["c_ci95_high"] and r["L2_term"] == "resolved positive"
        assert r["L_star"] == pytest.approx(L_STAR[level], abs=0.5)
    for level in IMPL:
        r = table.loc[(level, "recurrent")]
        assert r["L2_term"] == "not resolved" and r["c_ci95_low"] <= 0 <= r["c_ci95_high"] and np.isnan(r["L_star"])
    assert table.loc[("model2", "reforward"), "L2_term"] == "not fitted: 3 stable lengths (4 needed)"


def test_title_and_legend_say_what_the_terms_are(data, drawn, tmp_path):
    assert report.plot_cumulative(data, str(tmp_path / "c.png"))
    assert claims(drawn["title"]) == TRUTH
    assert claims(drawn["title"]) == from_fits(report.cumulative_table(data))
    parts = {t: t.split(" (")[0].split(" / ") for t in drawn["labels"]}
    label = {(p[0], p[-1]): t for t, p in parts.items()}   # (level, mode) -> label
    assert all(len(set(p)) == len(p) for p in parts.values()), parts   # "model / recurrent", not twice
    assert f"dominant from L ≈ {L_STAR['model']}" in label[("model", "reforward")]
    assert all("not resolved" in label[(level, "recurrent")] for level in IMPL)
    assert "not fitted" in label[("model2", "reforward")]


@pytest.mark.parametrize("planted", ["old_promise", "modes_swapped"])
def test_a_title_the_fits_do_not_show_is_caught(data, drawn, tmp_path, monkeypatch, planted):
    real = report.cumulative_title
    wrong = {"old_promise": lambda rows: OLD_TITLE,
             "modes_swapped": lambda rows: real([dict(r, mode="recurrent" if r["mode"] == "reforward" else "reforward")
                                                 for r in rows])}[planted]
    monkeypatch.setattr(report, "cumulative_title", wrong)
    report.plot_cumulative(data, str(tmp_path / "c.png"))
    assert claims(drawn["title"]) != from_fits(report.cumulative_table(data))


def test_the_report_tables_the_fits(data, tmp_path):
    md_path, html_path = report.build(data, [], str(tmp_path / "report"))
    md = open(md_path).read()
    section = md[md.index("## Cumulative generation time"):]
    section = section[:section.index("\n## ")] if "\n## " in section else section
    assert "](cumulative.png)" in section
    header = next(line for line in section.splitlines() if line.startswith("|"))
    assert "slope" not in header
    for column in ("c_s", "c_ci95_low", "c_ci95_high", "L2_term", "L_star"):
        assert f" {column} " in header
    assert section.count("| resolved positive") == len(REFORWARD) and section.count("| not resolved") == len(IMPL)
    assert "L2_term" in open(html_path).read()
