# Helix: the two commands a user needs are `make demo` and `make test`.
# Everything below installs itself into .venv; re-running is fast when nothing changed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.helix-installed

.PHONY: test lint demo bench install clean protos chaos mutate

install: $(STAMP)

# The venv is rebuilt only when the pinned requirements or the package metadata change.
$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null || \
	  { echo "helix: needs Python 3.11 or newer as '$(PYTHON)' (Debian: apt-get install python3)"; exit 1; }
	@$(PYTHON) -c 'import venv, ensurepip' 2>/dev/null || \
	  { echo "helix: Python's venv module is missing: apt-get install python3-venv"; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $(STAMP)

# Two pytest workers (pytest-xdist): most of the suite's wall time is live tests waiting on real
# processes, so two run side by side on a 2-core machine. TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
test: $(STAMP)
	@bash deploy/sysdeps.sh || true  # Debian tools the tests use (shellcheck, promtool); never fails
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# Static checks, configured in pyproject.toml: ruff's lint rules, ruff's formatting (check only:
# `.venv/bin/ruff format` applies it) and mypy. All three run; any failure fails the target.
lint: $(STAMP)
	@status=0; \
	echo "ruff check"; $(BIN)/ruff check . || status=1; \
	echo "ruff format --check"; $(BIN)/ruff format --check . || status=1; \
	echo "mypy"; $(BIN)/mypy || status=1; \
	exit $$status

demo: $(STAMP)
	$(BIN)/python -m deploy.local.demo $(DEMO_ARGS)

# The local stack under a seeded random schedule of faults, checked against its invariants:
# CHAOS_DURATION seconds of faults (default 600), CHAOS_SEED (default random, printed).
chaos: $(STAMP)
	$(BIN)/python -m deploy.local.chaos $(CHAOS_ARGS)

bench: $(STAMP)
	$(BIN)/python -m bench $(BENCH_ARGS)

# Mutation testing (mutmut) of the pure core, on a temporary copy of the tree (this one is never
# written): a score per module and every surviving mutant. MUTATE_MODULES limits a run, e.g.
# `make mutate MUTATE_MODULES=controller_asg/fleet.py`; controller_asg/policy/predictive.py is
# mapped too but left out by default (about 10 minutes). MUTATE_JOBS: mutants tested at once.
MUTATE_MODULES ?= controller_asg/health.py controller_asg/fleet.py controller_asg/termination.py \
	controller_asg/policy/threshold.py controller_asg/policy/target.py monitor_s/validation.py \
	shared/config.py controller_asg/sim/metrics.py controller_asg/gate.py controller_asg/breaker.py \
	controller_asg/plan.py
MUTATE_JOBS ?= 1
mutate: $(STAMP)
	$(BIN)/python -m tests.mutate --jobs $(MUTATE_JOBS) $(MUTATE_ARGS) $(MUTATE_MODULES)

# Regenerates the committed gRPC code from protos/helix.proto (a test checks they agree).
protos: $(STAMP)
	$(BIN)/python -m protos.generate

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .mypy_cache .ruff_cache build *.egg-info
