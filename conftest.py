"""Nothing here: the suite's hooks and options are its pytest plugin, equivalence/plugin.py,
registered by the package's pytest11 entry point (pyproject.toml), so that they work as well from
a kernel's own repository as from this checkout."""
