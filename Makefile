# Helix: the two commands a user needs are `make demo` and `make test`.
# Everything below installs itself into .venv; re-running is fast when nothing changed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.helix-installed

.PHONY: test demo bench install clean protos

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

test: $(STAMP)
	@bash deploy/sysdeps.sh || true  # Debian tools the tests use (shellcheck, promtool); never fails
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/python -m deploy.local.demo $(DEMO_ARGS)

bench: $(STAMP)
	$(BIN)/python -m bench $(BENCH_ARGS)

# Regenerates the committed gRPC code from protos/helix.proto (a test checks they agree).
protos: $(STAMP)
	$(BIN)/python -m protos.generate

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
