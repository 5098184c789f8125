# make run   : install everything, format pnova.img (1 GiB) if absent, mount it on ./mnt
# make test  : install everything, run the whole test suite
# make umount: unmount ./mnt
# make crashtest / crashtest-long: crash injection (seq1, dual, edge in about a minute; seq2 + random in minutes)
# make compare: the pNOVA comparison (DWOM, DRBM, DWOL x lock schemes x 1..N workers,
#               engine, pnova mount, tmpfs), written into docs/PERFORMANCE.md (minutes)
# make compare-fuse: pnova's mount beside libfuse's passthrough_ll and pyfuse3's
#               passthroughfs.py (built into build/ from this machine's packages) and
#               tmpfs, buffered and direct, written into docs/PERFORMANCE.md (minutes)
# make install-helpers: (root) link pnova, mkfs.pnova, fsck.pnova into /usr/local/bin
#                       so that mount -t fuse.pnova, mkfs -t pnova, fsck -t pnova work
# make fuse-uring: (root) switch on the kernel's FUSE over io_uring (Linux 6.14+;
#                  until the next boot), which pnova uses to serve each CPU's
#                  requests on that CPU; run, test and the comparisons do it first
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
IMAGE ?= pnova.img
MNT ?= mnt
SIZE ?= 1G
STAMP := $(VENV)/.installed

.PHONY: run test bench deps venv umount clean install-helpers fuse-uring crashtest crashtest-long \
	compare compare-fuse

deps:
	@if ! command -v fusermount3 >/dev/null || ! pkg-config --exists fuse3 2>/dev/null \
			|| ! command -v gcc >/dev/null; then \
		echo "installing Debian packages: fuse3 libfuse3-dev pkg-config gcc"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq fuse3 libfuse3-dev pkg-config gcc >/dev/null; \
	fi

$(STAMP): pyproject.toml setup.py pnova/_atomic.c pnova/_protect.c pnova/_persist.c pnova/_uring.c | deps
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

venv: deps $(STAMP)

# mount(8) starts its helpers without the caller's PATH (the shell's default path,
# which includes /usr/local/bin, applies), so the commands must be linked there.
HELPER_DIR ?= /usr/local/bin
HELPERS := pnova mkfs.pnova fsck.pnova pnova-crashtest pnova-inject pnova-scrub fxmark

install-helpers: venv
	@if [ "$$(id -u)" = 0 ]; then \
		for h in $(HELPERS); do ln -sfn "$(abspath $(VENV))/bin/$$h" "$(HELPER_DIR)/$$h"; done; \
		echo "linked $(HELPERS) into $(HELPER_DIR)"; \
	else \
		echo "hint: as root, run 'make install-helpers' so that mount -t fuse.pnova finds pnova"; \
	fi

URING_PARAM := /sys/module/fuse/parameters/enable_uring
fuse-uring:
	@if [ ! -e $(URING_PARAM) ]; then \
		echo "this kernel has no FUSE over io_uring: pnova reads /dev/fuse"; \
	elif [ "$$(cat $(URING_PARAM))" != Y ]; then \
		if [ "$$(id -u)" = 0 ]; then echo Y > $(URING_PARAM) && \
			echo "switched on FUSE over io_uring ($(URING_PARAM))"; \
		else echo "hint: as root, run 'make fuse-uring' (FUSE over io_uring is off)"; fi; \
	fi

run: venv install-helpers fuse-uring
	@if [ -e "$(IMAGE)" ]; then echo "$(IMAGE) exists: mounting it as is"; \
	else $(VENV)/bin/mkfs.pnova --size $(SIZE) $(IMAGE); fi
	@mkdir -p $(MNT)
	$(VENV)/bin/pnova $(IMAGE) $(MNT)
	@echo "mounted $(IMAGE) on $(MNT); unmount with: fusermount3 -u $(MNT)   (or: make umount)"

umount:
	fusermount3 -u $(MNT)

test: venv install-helpers fuse-uring
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider

crashtest: venv
	$(VENV)/bin/pnova-crashtest --workload seq1 --max-k 2
	$(VENV)/bin/pnova-crashtest --workload dual --max-k 2
	$(VENV)/bin/pnova-crashtest --workload edge --max-k 2 --jobs $$(nproc)
	$(VENV)/bin/pnova-crashtest --model pages --workload seq1 --jobs $$(nproc)
	$(VENV)/bin/pnova-crashtest --model pages --workload edge --jobs $$(nproc)

# Every ordered pair of seq1 operations, then seeded random sequences (minutes).
crashtest-long: venv
	$(VENV)/bin/pnova-crashtest --workload seq2 --max-k 2 --jobs $$(nproc)
	for seed in 1 2 3 4 5 6 7 8; do $(VENV)/bin/pnova-crashtest --workload random --seed $$seed --max-k 2 --jobs $$(nproc) || exit 1; done
	$(VENV)/bin/pnova-crashtest --model pages --workload seq2 --jobs $$(nproc)

COMPARE_DURATION ?= 5
compare: venv install-helpers fuse-uring
	$(VENV)/bin/fxmark reproduce --duration $(COMPARE_DURATION) --out results/pnova-comparison \
		--doc docs/PERFORMANCE.md --figure docs/figures/pnova-comparison

compare-fuse: venv install-helpers fuse-uring
	$(VENV)/bin/fxmark compare-fuse --duration $(COMPARE_DURATION) --build build \
		--out results/fuse-comparison --doc docs/PERFORMANCE.md \
		--figure docs/figures/fuse-comparison

# Engine paths timed in one process (pytest-benchmark); BENCH_ARGS passes options,
# e.g. --benchmark-autosave, then --benchmark-compare on the next version.
BENCH_ARGS ?=
bench: venv
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider benchmarks/ \
		--benchmark-columns=min,median,max,rounds $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
