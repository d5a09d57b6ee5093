# tether: the two commands a new user needs are `make image` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMPS := .cache/stamps
NAME ?=
export CHECKPOINT_DISABLE := 1

.PHONY: help deps venv image verify test test-unit test-integration test-image bench lint clean

help:
	@echo "make image       build a verified appliance OVA + raw disk into images/<name>/"
	@echo "make verify NAME=...  re-run the image checks on images/<name>/"
	@echo "make test        the whole test suite (builds an image when none is cached)"
	@echo "make bench       benchmarks; figures go to bench/results/"

deps: $(STAMPS)/apt venv

$(STAMPS)/apt: deps/apt-packages.txt deps/install-apt
	@./deps/install-apt
	@mkdir -p $(STAMPS) && touch $@

venv: $(STAMPS)/venv

$(STAMPS)/venv: pyproject.toml $(STAMPS)/apt
	@echo "deps: python venv in $(VENV)"
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	@$(VPY) -m pip install -q --upgrade pip
	@$(VPY) -m pip install -q -e '.[build,test]'
	@mkdir -p $(STAMPS) && touch $@

image: deps
	@$(VPY) -m tether.image.cli build $(if $(NAME),--name $(NAME))

verify: deps
	@test -n "$(NAME)" || { echo "make verify: give NAME=<image name> (ls images/)"; exit 2; }
	@$(VPY) -m tether.image.cli verify --name $(NAME)

test: deps
	@$(VPY) tests/run.py

bench: deps
	@$(VPY) bench/run.py

clean:
	rm -rf build dist *.egg-info
