"""Which test fails first, and on what case, for each planted bug: the README's smallest-failure table.

    .venv/bin/python -m equivalence.smallest_failures [--bug NAME ...] [--out table.md]

For each bug in equivalence/selective/planted_bugs.py it runs what a kernel author runs,
``pytest -x --impl equivalence.selective.planted_bugs:NAME`` (the ``ci`` hypothesis profile, its seed printed), and
reads off the first failing test, the case it failed on (from its reproduce line, shown as Case.id:
sizes, grouping, dtype, regime, the options that are on, the seed) and what the
failure needs (conftest.py's re-run with each option off and each axis reduced). Prints a markdown
table (pandas), one row per bug as it finishes.
"""

import argparse
import re
import subprocess
import sys
import time

import pandas as pd

from .selective import planted_bugs
from .selective import Case


def first_failure(bug, timeout=900):
    """Run the suite with -x on one planted bug. Returns a dict for the table's row."""
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--hypothesis-profile", "ci",
           f"--impl=equivalence.selective.planted_bugs:{bug}", "equivalence"]
    start = time.monotonic()
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    seconds = time.monotonic() - start
    failed = re.search(r"^FAILED (\S+)", run.stdout, re.M)
    case = re.search(r"reproduce: .*?equivalence\.cases\.(Case\(.*?\))\), return_last_state", run.stdout)
    needs = re.search(r"what the failure needs \(.*?\) -+\n(.*?)(?:\n=|\n_|\Z)", run.stdout, re.S)
    return dict(bug=bug, first_failure=failed.group(1).split("::", 1)[1] if failed else "none (passed)",
                case=eval(case.group(1), {"Case": Case}).id if case else "", needs="; ".join(needs.group(1).strip().splitlines()) if needs else "",
                seconds=round(seconds))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bug", action="append", choices=planted_bugs.BUGS, help="default: every planted bug")
    parser.add_argument("--out", help="also write the markdown table here")
    args = parser.parse_args(argv)
    rows = []
    for bug in args.bug or planted_bugs.BUGS:
        rows.append(first_failure(bug))
        print(rows[-1], flush=True)
    table = pd.DataFrame(rows).to_markdown(index=False)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
