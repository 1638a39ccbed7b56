"""pytest wiring: the suite's plugin (equivalence/plugin.py) holds every hook and option."""

pytest_plugins = ["equivalence.plugin"]
