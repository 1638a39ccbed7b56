# Two targets do everything: `make test` and `make report`. Each creates .venv and installs the
# project with its dev dependencies on first use (torch is pinned to the 2.13.0 CPU build).
VENV   := .venv
PYTHON := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test report clean clean-results

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# Two worker processes (pytest-xdist, a dev dependency): measured faster than one on this 2-core
# machine (docs/testing.md). The suite passes the same either way.
# Each run draws a fresh hypothesis seed, printed in the header and beside each failure; SEED=N
# replays that run's draws exactly.
test: $(STAMP)
	$(PYTHON) -m pytest -n 2 $(if $(SEED),--hypothesis-seed $(SEED))

# The default sweep resumes results/results.jsonl, reusing only points measured at this commit, tree,
# machine and settings (it says how many); after a code change it measures everything again, and the
# report shows the file's latest run only, listing what it left out. `make clean-results` starts afresh.
report: $(STAMP)
	$(VENV)/bin/scanbench sweep --resume --out results/results.jsonl
	$(VENV)/bin/scanbench report --results results/results.jsonl --out results/report

clean-results:
	rm -rf results

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
