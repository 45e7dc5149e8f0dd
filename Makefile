# Two entry points, both self-contained on a fresh machine with Python 3.11:
#   make demo   build the bundled PBMC corpus and pretrain the debug Geneformer on it (CPU)
#   make test   check format and lint (ruff), then run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.celltron-installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# CPU torch first: pyproject asks for torch>=2.4, which this then satisfies (no CUDA download).
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test,s3,fast,deepspeed,bench,chem,eval,hvg,scvi]"
	# scGPT's own code is the reference in equivalence tests; its pinned dependencies (torchtext,
	# datasets<3, scvi-tools<1) do not install beside current torch, so only the package itself.
	$(BIN)/python -m pip install --quiet --no-deps scgpt==0.2.4
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/celltron demo --out runs/demo --config configs/pretrain/geneformer_debug.yaml

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
