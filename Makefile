# make run   - build into .venv and run the default boot-cost sweep (pyvmm bench)
# make test  - build into .venv and run the test suite
# make bench - the same sweep with more repeats
# make lab   - the sweep on another Debian kernel under QEMU (KERNEL=6.1, 6.12, 7.3, latest)
# make fuzz  - fuzz every input parser (libFuzzer + sanitizers for C, Hypothesis for Python)
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.pyvmm-installed
SOURCES = $(shell find pyvmm csrc guests -type f \( -name '*.py' -o -name '*.c' -o -name '*.h' \
            -o -name '*.S' -o -name '*.inc' -o -name '*.patch' -o -name INDEX \) -not -name _abi.py 2>/dev/null) pyproject.toml setup.py buildsteps.py

KERNEL ?= 6.1

.PHONY: run test bench lab fuzz info install clean

run: $(STAMP)
	$(BIN)/pyvmm bench

test: $(STAMP)
	$(BIN)/pytest -q tests

bench: $(STAMP)
	$(BIN)/pyvmm bench --repeats 60

lab: $(STAMP)
	@sh scripts/lab-tools.sh --install
	$(BIN)/pyvmm lab kernel --kernel $(KERNEL)

fuzz: $(STAMP)
	@sh scripts/fuzz-tools.sh --install
	$(BIN)/python fuzz/run.py

info: $(STAMP)
	$(BIN)/pyvmm info

install: $(STAMP)

$(STAMP): $(SOURCES)
	@sh scripts/check-build-tools.sh
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check --config-settings editable_mode=compat \
	    -e '.[test,fleet]'
	@# The checkout is the install: compile its bytecode now, since an editable install
	@# has none and PYTHONDONTWRITEBYTECODE (set on some hosts) would leave every process
	@# compiling pyvmm from source at start-up.
	$(BIN)/python -m compileall -q pyvmm
	@rm -rf build
	@touch $@

clean:
	rm -rf $(VENV) build *.egg-info results pyvmm/guests pyvmm/bin pyvmm/_build.py \
	    pyvmm/vmm/_ioctl_numbers.py pyvmm/vmm/_abi.py pyvmm/_native.*.so pyvmm/vmm/_sys.*.so \
	    pyvmm/_ioctl_numbers.py pyvmm/_abi.py pyvmm/_sys.*.so
