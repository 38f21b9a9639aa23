# Two entry points, both from a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
STAMP  := $(VENV)/.installed

.PHONY: install demo test clean

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

clean:
	rm -rf $(VENV) build *.egg-info qkdnode/_native*.so demo-work

include mk/native.mk
