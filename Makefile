# Two commands set everything up on a fresh Debian 12 machine with Python 3.11:
#   make demo   - venv, install, run `ec2-agent simulate` on the embedded emulated cloud
#   make test   - venv, install, lint, run the suite inside a network namespace with only loopback
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=
# Network isolation: as root a plain new net namespace, otherwise a user namespace too.
NETNS := $(shell [ "$$(id -u)" = 0 ] && echo "unshare -n" || echo "unshare -rn")

.PHONY: demo test lint unit bench install venv clean dist image-cache

$(BIN)/.installed: setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/ec2-agent simulate

lint: venv
	$(BIN)/ruff check agent tests bench
	$(BIN)/vermin --target=3.10- --violations --no-tips -q agent/
	$(BIN)/lint-imports --no-cache

# The real-boot test's inputs (tests/realboot): a Debian 12 root filesystem (mmdebstrap)
# and an offline wheelhouse, cached under /var/cache/ec2-agent-test. Built here, on the
# host, because they need the Debian mirror and PyPI and the suite runs without network.
# Quick when cached; where they cannot be built (not root, no mmdebstrap) it says why and
# the test skips with the same reason.
image-cache: venv
	$(BIN)/python tests/realboot/image.py

test: venv lint image-cache
	$(NETNS) sh -c 'ip link set lo up && exec $(BIN)/python -m pytest -n 2 $(PYTEST_ARGS)'

unit: venv
	$(BIN)/python -m pytest tests/unit -q

bench: venv
	$(BIN)/python -m bench


dist: venv
	$(BIN)/python -m build --outdir dist .

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
include packaging/install.mk

# Long runs kept out of `make test`. Other soaks may add themselves as prerequisites.
.PHONY: soak soak-userdata soak-sim
soak: soak-userdata soak-sim

# 10,000+ generated user-data cases judged against cloud-init's own processing
# (needs the Debian cloud-init package, as .ci/run installs it).
soak-userdata: venv
	$(BIN)/python -m tests.referee.soak --cases $${USERDATA_SOAK_CASES:-10000}

# Deterministic fleet simulation (agent.sim.fleetsim): seeds across the fault profiles for
# SIM_SOAK_MINUTES; prints a replay command for every run with a violation.
soak-sim: venv
	$(BIN)/python -m agent.sim.soak --minutes $${SIM_SOAK_MINUTES:-30}

# Re-introduced bugs (issue #11): each mutant of bench/bench_mutants.py against the CI seed set
# of tests/sim/test_fleetsim.py; writes its table to docs/benchmarks.md and exits 1 if a
# required one is not caught. Minutes; not in `make test`.
.PHONY: mutants
mutants: venv
	$(NETNS) sh -c 'ip link set lo up && exec $(BIN)/python -m bench mutants'
