"""The scanbench command (reports/cli.py), started so that it imports the suite's own ``reports`` and
``benchmarks`` packages even where a folder of either name comes first on sys.path: the suite
installs them under these plain top-level names, and a kernel's repository run with PYTHONPATH=.
may have its own. Once both are imported, their modules are found through them, so sys.path is
given back unchanged (a kernel's modules are still found where the caller put them)."""

import os
import sys


def main(argv=None):
    path = sys.path[:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    try:
        import benchmarks  # noqa: F401 (bound to the suite's own before anything imports from it)
        from reports import cli
    finally:
        sys.path[:] = path
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
