# Two entry points, both from a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
STAMP  := $(VENV)/.installed

.PHONY: install demo test reliability clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py native/*.c native/*.h native/build_native.py
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: install
	$(VENV)/bin/qkdnode demo --workdir demo-work

test: install
	$(VENV)/bin/python -m pytest -q

# The reliability and security campaign (issue 9): runs it and rewrites docs/reliability.md.
# Bounded by default; QKDNODE_CAMPAIGN=long make reliability for the full fault matrix and a long soak.
reliability: install
	$(VENV)/bin/python -m tests.campaign --out docs/reliability.md

clean:
	rm -rf $(VENV) build *.egg-info qkdnode/_native*.so demo-work

include mk/native.mk
