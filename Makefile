# Two targets do everything: `make test` and `make report`. Each creates .venv and installs the
# project with its dev dependencies on first use (torch is pinned to the 2.13.0 CPU build).
VENV   := .venv
PYTHON := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test report clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(PYTHON) -m pytest

report: $(STAMP)
	@if [ -f reports/cli.py ]; then $(VENV)/bin/scanbench sweep --quick && $(VENV)/bin/scanbench report; \
	else echo "nothing to report yet"; fi

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
