# One entry point for people and CI.  `make demo` and `make test` install what
# they need first (apt packages, the .venv), so a fresh Debian 12 machine works.

SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
APT_PACKAGES := openssl kamailio kamailio-python3-modules kamailio-utils-modules \
                kamailio-extra-modules sip-tester tcpdump python3-venv
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
STAMP := $(VENV)/.installed

.PHONY: setup apt venv test test-unit bench demo clean fuzz soak

setup: apt venv

apt:
	@missing=""; for p in $(APT_PACKAGES); do \
	    dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	    echo "installing apt packages:$$missing"; \
	    $(SUDO) apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi

# Kamailio embeds /usr/bin/python3, so the venv must be made from that same interpreter.
$(PY):
	/usr/bin/python3 -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[softphone,test]'
	touch $(STAMP)

venv: $(STAMP)

test: setup
	$(PY) -m pytest tests

test-unit: venv
	$(PY) -m pytest tests/unit tests/interop

bench: setup
	$(PY) -m pytest bench -p no:cacheprovider --benchmark-only -q

# Hostile input, the long run: every parser under atheris for FUZZ_SECONDS
# (default 300) each; executions per target go to fuzz/results/fuzz-*.json.
fuzz: venv
	@$(PY) -c 'import atheris' 2>/dev/null || $(PIP) install -q atheris
	$(PY) fuzz/run.py --seconds $(or $(FUZZ_SECONDS),300)

# Soak: SIPp through the trusted proxy at half load (MESSAGE + INVITE dialogs with CEK
# reuse) for SOAK_SECONDS (default 600), Kamailio memory sampled every 10 s;
# JSON to bench/results/soak-*.json, exit 0 only with zero failed calls and flat memory.
soak: setup
	SOAK_SECONDS=$(or $(SOAK_SECONDS),600) $(PY) bench/soak.py

demo: setup
	$(PY) -m pjsua_hooks.demo

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks
