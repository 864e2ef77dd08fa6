#!/usr/bin/env bash
# One command for a fresh machine: virtualenv, pinned dependencies, llama.cpp (built from the
# llama-cpp-python sdist with its tools), llama.cpp's HF->GGUF converter from the same sdist,
# then the main job on the tiny default. Idempotent: a second run installs and rebuilds nothing.
#
#   ./setup.sh              # set up, then: snakemake --cores 1 (the tiny default target)
#   ./setup.sh --no-run     # set up only
#   ./setup.sh --gpu        # also the GPU training stack (Unsloth, bitsandbytes): CUDA machines only
set -euo pipefail
cd "$(dirname "$0")"

LLAMA_CPP_PYTHON_VERSION=0.3.36
TORCH_VERSION=2.13.0
VENV=.venv
TOOLS=tools
PY="$VENV/bin/python"
run_main_job=1
[[ " $* " == *" --no-run "* ]] && run_main_job=0

step() { printf '\n== %s\n' "$*"; }

if [[ ! -x "$PY" ]]; then
  step "creating virtualenv $VENV"
  python3 -m venv "$VENV"
  "$PY" -m pip install -q --upgrade pip
fi

# A stamp of everything that decides the environment: change a pin and it reinstalls.
stamp="$VENV/.loraforge-deps"
want="torch==$TORCH_VERSION llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION $(sha256sum requirements.txt pyproject.toml | sha256sum | cut -c1-16)"
if [[ "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
  # torch first and pinned: the CPU wheel. Anything that asks for torch later is satisfied.
  step "installing torch==$TORCH_VERSION (CPU)"
  "$PY" -m pip install -q "torch==$TORCH_VERSION"
  step "installing pinned requirements"
  "$PY" -m pip install -q -r requirements.txt
  step "building llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION with its tools (first time ~8 min on 2 cores)"
  # GGML_NATIVE=OFF: a native build enables AMX on these Xeons and quantized GGUFs segfault.
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_TOOLS_INSTALL=ON -DLLAVA_BUILD=OFF" \
    "$PY" -m pip install -q "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"
  "$PY" -m pip install -q --no-deps -e .
  if "$PY" -m pip list 2>/dev/null | grep -qi nvidia; then
    echo "error: a CUDA package was installed on a CPU machine" >&2; exit 1
  fi
  echo "$want" > "$stamp"
else
  echo "environment up to date ($VENV)"
fi

# llama.cpp's converter at the same commit as the quantizer: from the same sdist.
if [[ "$(cat "$TOOLS/llama.cpp/.version" 2>/dev/null)" != "$LLAMA_CPP_PYTHON_VERSION" ]]; then
  step "extracting llama.cpp's converter into $TOOLS/llama.cpp"
  tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
  "$PY" -m pip download -q --no-deps --no-binary :all: -d "$tmp" "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"
  tar xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$tmp" --wildcards \
    '*/vendor/llama.cpp/convert_hf_to_gguf.py' '*/vendor/llama.cpp/convert_lora_to_gguf.py' \
    '*/vendor/llama.cpp/conversion/*' '*/vendor/llama.cpp/gguf-py/*' '*/vendor/llama.cpp/LICENSE'
  rm -rf "$TOOLS/llama.cpp"; mkdir -p "$TOOLS"
  mv "$tmp"/llama_cpp_python-*/vendor/llama.cpp "$TOOLS/llama.cpp"
  echo "$LLAMA_CPP_PYTHON_VERSION" > "$TOOLS/llama.cpp/.version"
else
  echo "llama.cpp converter up to date ($TOOLS/llama.cpp)"
fi

# GPU training stack, only on request and only where CUDA works: the CPU install stays free of it.
if [[ " $* " == *" --gpu "* ]]; then
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "error: --gpu needs a CUDA GPU and a CUDA build of torch (this torch: $("$PY" -c 'import torch; print(torch.__version__)'))" >&2
    exit 1
  fi
  step "installing the GPU training stack (requirements-gpu.txt)"
  "$PY" -m pip install -q --no-deps -r requirements-gpu.txt
  UNSLOTH_SKIP_TORCHVISION_CHECK=1 "$PY" -c "import unsloth, bitsandbytes; print('unsloth', unsloth.__version__)"
fi

if [[ $run_main_job == 1 ]]; then
  step "running the main job: snakemake --cores 1 (tiny default)"
  "$VENV/bin/snakemake" --cores 1
  echo
  echo "Done. The tiny default's fine-tuned model and its Ollama Modelfile:"
  ls -l results/tiny/Q5_K_M.gguf results/tiny/Modelfile
  echo "(all artifacts: results/tiny/; logs: logs/tiny/; see README 'What you get')"
fi
