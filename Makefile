# Two entry points for a fresh machine (see README.md):
#   make export [MODEL=path-or-hub-id] [OPS=contrib|portable]   install, then export (the demo model by default)
#   make test                                                    install, then lint and run the test suite
# and, for the edit loop, make test-fast: the tests not marked slow (every folder, ~1 min on 2 cores).
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL ?=
OPS ?= contrib
# pytest-xdist: one worker per core of a 2-core machine, each test file on one worker (its module fixtures built
# once); the shared demo bundles are exported once for both (tests/shared_bundles.py). TEST_WORKERS= runs serially.
TEST_WORKERS ?= -n 2 --dist loadfile --max-worker-restart 0

.PHONY: install export test test-fast display-deps

install: $(VENV)/.installed

# torch is pinned to the CPU wheel first: an unpinned resolve pulls a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

export: install
	$(VENV)/bin/lfm-export $(MODEL) --ops $(OPS)

test: install display-deps
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q $(TEST_WORKERS)

test-fast: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -m "not slow" $(TEST_WORKERS)

# The app's GUI test runs Kivy under a virtual X display: Xvfb, Mesa's software OpenGL, and the X
# libraries the SDL2 bundled in kivy's wheel loads. Installed (as root, with apt) only when missing;
# elsewhere a note, and the GUI test skips unless CI is set.
DISPLAY_DEBS := xvfb libgl1 libglx-mesa0 libgl1-mesa-dri libx11-6 libxext6 libxrender1 libxcursor1 libxi6 \
	libxrandr2 libxss1 libxfixes3
display-deps:
	@missing=$$(for p in $(DISPLAY_DEBS); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | \
		grep -q 'install ok installed' || printf '%s ' $$p; done); \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing for the GUI test: $$missing"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -qq --no-install-recommends $$missing >/dev/null 2>&1 || \
		{ apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends $$missing >/dev/null; }; \
	else \
		echo "note: the GUI test needs: apt-get install --no-install-recommends $$missing"; \
	fi

# arm64 correctness of the phone default: the --target android bundle must decode to the x86 greedy tokens
# on arm64 onnxruntime under qemu (mobile_app/arm_check/README.md). Needs root; installs qemu-user-static,
# debootstrap, binfmt-support and debian-archive-keyring with apt when missing; exits 2 (never skips) when
# it cannot run here. About 4 min on a fresh machine, 1.5 min with its cache (~/.cache/lfm-edge/arm_check).
.PHONY: arm-check
arm-check: install
	ARMCHECK_PYTHON=$(abspath $(PY)) bash mobile_app/arm_check/run.sh
