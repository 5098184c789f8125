# make run   : install everything, format pnova.img (1 GiB) if absent, mount it on ./mnt
# make test  : install everything, run the whole test suite
# make umount: unmount ./mnt
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
IMAGE ?= pnova.img
MNT ?= mnt
SIZE ?= 1G
STAMP := $(VENV)/.installed

.PHONY: run test deps venv umount clean

deps:
	@if ! command -v fusermount3 >/dev/null || ! pkg-config --exists fuse3 2>/dev/null; then \
		echo "installing Debian packages: fuse3 libfuse3-dev pkg-config"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq fuse3 libfuse3-dev pkg-config >/dev/null; \
	fi

$(STAMP): pyproject.toml | deps
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

venv: deps $(STAMP)

run: venv
	@if [ -e "$(IMAGE)" ]; then echo "$(IMAGE) exists: mounting it as is"; \
	else $(VENV)/bin/mkfs.pnova --size $(SIZE) $(IMAGE); fi
	@mkdir -p $(MNT)
	$(VENV)/bin/pnova $(IMAGE) $(MNT)
	@echo "mounted $(IMAGE) on $(MNT); unmount with: fusermount3 -u $(MNT)   (or: make umount)"

umount:
	fusermount3 -u $(MNT)

test: venv
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider

clean:
	rm -rf $(VENV) build *.egg-info
