# tether: the two commands a new user needs are `make image` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMPS := .cache/stamps
NAME ?=
export CHECKPOINT_DISABLE := 1

.PHONY: help deps venv image bundle verify test bench boot-test ami launch-aws clean

help:
	@echo "make image       build a verified appliance OVA + raw disk into images/<name>/"
	@echo "make bundle NAME=... [HOME_STATE=dir]  write images/<name>/<name>.raucb, the signed update bundle"
	@echo "make verify NAME=...  re-run the image checks on images/<name>/"
	@echo "make test        the whole test suite (builds an image when none is cached)"
	@echo "make bench       benchmarks; figures go to bench/results/"
	@echo "make boot-test NAME=...  boot the image under qemu and wait for it to check in at a test home"
	@echo "make ami NAME=...        publish images/<name>/<name>.raw as an AMI (AWS environment; AWS_ENDPOINT_URL to test)"
	@echo "make launch-aws NAME=... launch that AMI on a 4 vCPU / 16 GiB instance"

deps: $(STAMPS)/apt venv

$(STAMPS)/apt: deps/apt-packages.txt deps/install-apt
	@./deps/install-apt
	@mkdir -p $(STAMPS) && touch $@

venv: $(STAMPS)/venv

$(STAMPS)/venv: pyproject.toml $(STAMPS)/apt
	@echo "deps: python venv in $(VENV)"
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	@$(VPY) -m pip install -q --upgrade pip
	@echo "deps: installing the project and its Python packages (log: $(STAMPS)/pip.log)"
	@mkdir -p $(STAMPS)
	@$(VPY) -m pip install -q -e '.[build,test,home]' > $(STAMPS)/pip.log 2>&1 \
		|| { tail -n 25 $(STAMPS)/pip.log; echo "deps: pip failed; the whole log is $(STAMPS)/pip.log"; exit 1; }
	@mkdir -p $(STAMPS) && touch $@

# make image [NAME=] [HOME_STATE=dir | CREDENTIAL=bundle.json] [HOME_URL="wss://a/ wss://b/"]
image: deps
	@$(VPY) -m tether.image.cli build $(if $(NAME),--name $(NAME)) \
		$(if $(HOME_STATE),--home-state $(HOME_STATE)) $(if $(CREDENTIAL),--credential $(CREDENTIAL)) \
		$(foreach url,$(HOME_URL),--home-url $(url))

bundle: deps
	@test -n "$(NAME)" || { echo "make bundle: give NAME=<image name> (ls images/)"; exit 2; }
	@$(VPY) -m tether.image.cli bundle --name $(NAME) $(if $(HOME_STATE),--home-state $(HOME_STATE))

verify: deps
	@test -n "$(NAME)" || { echo "make verify: give NAME=<image name> (ls images/)"; exit 2; }
	@$(VPY) -m tether.image.cli verify --name $(NAME)

test: deps
	@$(VPY) tests/run.py

boot-test: deps
	@test -n "$(NAME)" || { echo "make boot-test: give NAME=<image name> (ls images/)"; exit 2; }
	@$(VPY) -m pytest tests/e2e --image-dir=images/$(NAME)

ami: deps
	@test -n "$(NAME)" || { echo "make ami: give NAME=<image name> (ls images/)"; exit 2; }
	@$(VPY) -m tether.image.ami publish --name $(NAME)

launch-aws: deps
	@test -n "$(NAME)" || { echo "make launch-aws: give NAME=<image name> (ls images/)"; exit 2; }
	@$(VPY) -m tether.image.ami launch --name $(NAME) $(if $(HOME_URL),--home-url $(HOME_URL))

bench: deps
	@$(VPY) bench/run.py

clean:
	rm -rf build dist *.egg-info
