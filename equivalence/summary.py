"""A review summary of a run: implementation x property, pass, fail or declared gap.

    pytest --scan-summary summary.md        # also written as Markdown, for a CI job to post

After the run the terminal shows one table per family; each failure is listed below it, in the
order failures are best met in (values first), with its smallest case (the final, shrunk case of a
property check, or hypothesis' falsifying example), what it needs, a Python line that reproduces
it and the command that replays the test. Loaded by the suite's pytest plugin; pytest's own
--junitxml is unaffected.

Which property a test checks is read from its file and name (PROPERTIES, first match wins), and
which implementation from its parameters, tagged on each test at collection (so that pytest-xdist
workers send the tag to the controller with each report).
"""

import os
import re

import pytest

# (column, pattern searched in "file::test name"), first match wins: "packed gradients" is a packed
# property, "inf ... by steps" a non-finite one.
PROPERTIES = (
    ("packed", r"varlen|packed|packing|seq_idx|boundar|state_batch_indices"),
    ("gradients", r"gradient"),
    ("determinism", r"determin"),
    ("unwritten memory", r"unwritten"),
    ("batch", r"batch"),
    ("non-finite", r"nan_|_nan|inf_|_inf|nonfinite|non_finite"),
    ("causality", r"causal"),
    ("split", r"split"),
    ("step", r"step|decod|prefill"),
    ("chunk size", r"chunk_size"),
    ("values", r"value|edge_case|last_state|final_states|reference|loop_defines|magnitudes"),
)
GAP = "declared gap"
TAG = "scan_summary"


def property_of(nodeid):
    """The column a test id belongs to ("other" when no pattern matches)."""
    path, _, name = nodeid.partition("::")
    text = f"{path.rsplit('/', 1)[-1]}::{name.split('[')[0]}"
    return next((column for column, pattern in PROPERTIES if re.search(pattern, text)), "other")


def pytest_addoption(parser):
    parser.getgroup("scan suite").addoption(
        "--scan-summary", default=None, metavar="FILE",
        help="also write the implementation x property summary as Markdown to FILE")


@pytest.hookimpl(trylast=True)  # after the plugin's ordering: a failure is listed in the order it is best met in
def pytest_collection_modifyitems(config, items):
    from .plugin import active, implementation_of

    if not active(config):
        return
    for position, item in enumerate(items):
        found = implementation_of(item)
        if found is not None:
            item.user_properties.append((TAG, (*found, property_of(item.nodeid), position)))


class Summary:
    """Outcomes per (family, implementation, property), and the failures' details."""

    def __init__(self):
        self.cells = {}      # (family, impl, property) -> set of outcomes
        # (position in the run, family, impl, property, nodeid, message, smallest case, its reproduce
        # line, what the failure needs, replay)
        self.failures = []

    def pytest_runtest_logreport(self, report):
        tag = dict(report.user_properties).get(TAG)
        if tag is None or (report.when != "call" and not (report.skipped or report.failed)):
            return
        outcome = ("expected failure" if hasattr(report, "wasxfail") else
                   GAP if report.skipped and GAP in str(report.longrepr) else
                   "skipped" if report.skipped else "fail" if report.failed else "pass")
        *tag, position = tag
        self.cells.setdefault(tuple(tag), set()).add(outcome)
        if outcome == "fail":
            from .plugin import CASE_TAG

            text = report.longreprtext
            message = next((line[2:].strip() for line in text.splitlines() if line.startswith("E ")), "")
            case, reproduce = dict(report.user_properties).get(CASE_TAG, ("", ""))
            if not case:  # not a property check's failure: hypothesis' own words, if any, with its draws
                plain = re.sub(r"(?m)^E(?: +|$)", "", text)   # pytest's mark on the exception's lines
                example = re.search(r"(?:Falsifying (?:explicit )?example|Failing test case):.*?(?=\n\s*\n|\Z)",
                                    plain, re.S)
                case = " ".join(example.group(0).split()) if example else ""
            needs = next((body for title, body in report.sections if title.startswith("what the failure needs")), "")
            replay = next((body for title, body in report.sections if title.endswith("replay")), "")
            self.failures.append((position, *tag, report.nodeid, message, case, reproduce, needs.strip(),
                                  replay.strip()))

    def verdict(self, outcomes):
        for word in ("fail", "pass", "expected failure", GAP, "skipped"):
            if word in outcomes:
                return word
        return ""

    def tables(self):
        """Markdown: one table per family, then the failures."""
        out = []
        for family in sorted({k[0] for k in self.cells}):
            keys = [k for k in self.cells if k[0] == family]
            columns = [c for c, _ in PROPERTIES if any(k[2] == c for k in keys)]
            columns += ["other"] * any(k[2] == "other" for k in keys)
            rows = list(dict.fromkeys(k[1] for k in keys))
            out += [f"### {family}", "", "| implementation | " + " | ".join(columns) + " |",
                    "|---" * (len(columns) + 1) + "|"]
            for impl in rows:
                out.append(f"| {impl} | " + " | ".join(self.verdict(self.cells.get((family, impl, c), ())) or "–"
                                                      for c in columns) + " |")
            out.append("")
        if self.failures:
            out += ["### Failures", ""]
            # in the run's order (values first), not the order parallel workers finished in
            for _, family, impl, prop, nodeid, message, case, reproduce, needs, replay in sorted(self.failures):
                out += [f"- **{family} / {impl} / {prop}**: `{nodeid}`", f"  - {message}"]
                out += [f"  - smallest case: `{case}`"] if case else []
                out += [f"  - {line}" for line in needs.splitlines()]
                out += [f"  - reproduce in Python: `{reproduce}`"] if reproduce else []
                out += [f"  - replay: `{line.strip()}`" for line in replay.splitlines() if line.strip().startswith(("pytest", "make", "python"))]
            out.append("")
        return "\n".join(out)


def check_writable(path):
    """Refuse, before any test runs, a --scan-summary FILE that could not be written after them."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise pytest.UsageError(f"--scan-summary {path}: is a folder; give a file name")
    if not os.path.isdir(folder):
        raise pytest.UsageError(f"--scan-summary {path}: no folder {folder}")
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise pytest.UsageError(f"--scan-summary {path}: not writable")


def pytest_configure(config):
    from .plugin import active

    if config.getoption("scan_summary", None):
        check_writable(config.getoption("scan_summary"))
    if active(config):
        config.pluginmanager.register(Summary(), "scan-summary-collector")


def pytest_terminal_summary(terminalreporter, config):
    summary = config.pluginmanager.get_plugin("scan-summary-collector")
    if summary is None or not summary.cells:
        return
    text = summary.tables()
    terminalreporter.section("scan summary: implementation x property")
    terminalreporter.write_line(text)
    path = config.getoption("scan_summary")
    if path:
        with open(path, "w") as f:
            f.write("# Scan suite summary\n\n" + text + "\n")
        terminalreporter.write_line(f"summary written to {path}")
