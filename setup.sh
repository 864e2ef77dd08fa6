#!/usr/bin/env bash
# One command for a fresh machine: virtualenv, pinned dependencies, llama.cpp (the library of
# the llama-cpp-python sdist), llama.cpp's HF->GGUF converter from the same sdist, Go (for the
# Ollama template test), Chromium (for the report test), then the main job on the tiny default. Idempotent: a second run
# installs and rebuilds nothing.
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

# llama.cpp build: the library (what quantize and generation call through llama_cpp) and its
# tools: llama-perplexity (quality: perplexity and KL divergence), llama-imatrix and
# llama-server (the serving test). The multimodal library stays off.
# GGML_NATIVE=OFF: a native build enables AMX on these Xeons and quantized GGUFs segfault.
LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_TOOLS_INSTALL=ON -DLLAMA_BUILD_SERVER=ON"

# A stamp of everything that decides the environment: change a pin or the build flags and it
# reinstalls.
stamp="$VENV/.loraforge-deps"
want="torch==$TORCH_VERSION llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION [$LLAMA_CMAKE_ARGS] $(sha256sum requirements.txt pyproject.toml | sha256sum | cut -c1-16)"
need_env=0; need_converter=0
[[ "$(cat "$stamp" 2>/dev/null)" != "$want" ]] && need_env=1
[[ "$(cat "$TOOLS/llama.cpp/.version" 2>/dev/null)" != "$LLAMA_CPP_PYTHON_VERSION" ]] && need_converter=1

# One download of the llama-cpp-python sdist serves both the library build and the converter,
# so they are one llama.cpp commit. --no-binary for this package only: with :all: pip would
# also build every build dependency of the sdist's metadata step from source (minutes).
sdist=""
if [[ $need_env == 1 || $need_converter == 1 ]]; then
  step "downloading the llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION sdist"
  tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
  "$PY" -m pip download -q --no-cache-dir --no-deps --no-binary llama-cpp-python -d "$tmp" \
    "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"
  sdist=$(ls "$tmp"/llama_cpp_python-*.tar.gz)
fi

if [[ $need_env == 1 ]]; then
  # torch first and pinned: the CPU wheel. Anything that asks for torch later is satisfied.
  step "installing torch==$TORCH_VERSION (CPU)"
  "$PY" -m pip install -q "torch==$TORCH_VERSION"
  step "installing pinned requirements"
  "$PY" -m pip install -q -r requirements.txt
  step "building llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION ($LLAMA_CMAKE_ARGS; first time ~5 min on 2 cores)"
  # --no-cache-dir --force-reinstall: pip's wheel cache keys a source build by the sdist only,
  # so a wheel cached from other CMAKE_ARGS (a native build, other tools) would be reused
  # silently; always build with these flags. --no-deps keeps the pinned numpy; the second
  # call installs the remaining dependencies (already satisfied ones are left alone).
  CMAKE_ARGS="$LLAMA_CMAKE_ARGS" "$PY" -m pip install -q --no-cache-dir --force-reinstall --no-deps "$sdist"
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
if [[ $need_converter == 1 ]]; then
  step "extracting llama.cpp's converter into $TOOLS/llama.cpp"
  tar xzf "$sdist" -C "$tmp" --wildcards \
    '*/vendor/llama.cpp/convert_hf_to_gguf.py' '*/vendor/llama.cpp/convert_lora_to_gguf.py' \
    '*/vendor/llama.cpp/conversion/*' '*/vendor/llama.cpp/gguf-py/*' '*/vendor/llama.cpp/LICENSE'
  rm -rf "$TOOLS/llama.cpp"; mkdir -p "$TOOLS"
  mv "$tmp"/llama_cpp_python-*/vendor/llama.cpp "$TOOLS/llama.cpp"
  echo "$LLAMA_CPP_PYTHON_VERSION" > "$TOOLS/llama.cpp/.version"
else
  echo "llama.cpp converter up to date ($TOOLS/llama.cpp)"
fi

# Go runs Ollama's own template engine (text/template) in the Modelfile test. Debian's
# golang-go, installed only as root with apt available; elsewhere that one test is skipped.
if ! command -v go >/dev/null; then
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    step "installing Go (Debian golang-go) for the Ollama template test"
    export DEBIAN_FRONTEND=noninteractive
    if ! { apt-get install -y -q --no-install-recommends golang-go >/dev/null ||
           { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends golang-go >/dev/null; }; }; then
      echo "warning: could not install golang-go; the Ollama template test will be skipped" >&2
    fi
  else
    echo "note: Go not found and apt-get unavailable (or not root): the Ollama template test will be skipped"
  fi
fi

# Chromium renders the HTML report in the report test (tests/test_report.py) and makes
# docs/report.png. Debian's chromium, installed only as root with apt available; elsewhere that
# test is skipped.
if ! command -v chromium >/dev/null; then
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    step "installing Chromium (Debian chromium) for the report test"
    export DEBIAN_FRONTEND=noninteractive
    if ! { apt-get install -y -q --no-install-recommends chromium >/dev/null ||
           { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends chromium >/dev/null; }; }; then
      echo "warning: could not install chromium; the report's browser test will be skipped" >&2
    fi
  else
    echo "note: chromium not found and apt-get unavailable (or not root): the report's browser test will be skipped"
  fi
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
