#!/usr/bin/env bash
# Packs what the GPU machine's image lacks to run the *workflow* (not only training) there, for
# bench/gpu_workflow.py: Snakemake and the workflow's own dependencies as Python 3.12 wheels
# (pinned as in requirements.txt), and this checkout's llama.cpp build (llama_cpp with its
# shared libraries: pure Python over ctypes, so the 3.11 build loads under 3.12). The image
# already has torch, transformers, numpy, safetensors and huggingface_hub; the training stack
# comes from ../shared/gpu/make-gpu-bundle.sh. xz keeps the two bundles under the device tool's
# 64 MiB carry limit (this one ~25 MB).
#
#   bash bench/make_workflow_bundle.sh gpu-bundle/workflow-bundle.tar.xz   # on the CPU machine
#   # on the GPU machine (after the GPU bundle):
#   python3 -c "import tarfile; tarfile.open('gpu-bundle/workflow-bundle.tar.xz').extractall('/tmp/site')"
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(readlink -f "${1:?usage: make_workflow_bundle.sh OUT.tar.xz}")
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
pin() { grep -E "^$1==" requirements.txt | head -1; }
pkgs=("$(pin 'snakemake\[reports\]' | sed 's/\[reports\]//')" "$(pin jsonschema)" "$(pin pandas)" "$(pin matplotlib)"
      "$(pin gguf)" "$(pin sentencepiece)" "$(pin PyYAML)" "$(pin tqdm)"
      diskcache==5.6.3)  # llama_cpp imports it
download() {
  python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --find-links "$work/whl" -d "$work/whl" "$@"
}
mkdir -p "$work/whl" "$work/site"
# connection_pool (a Snakemake dependency) is published as an sdist only: a pure-Python wheel
python3 -m pip wheel -q --no-deps -w "$work/whl" connection_pool==0.0.3
download "${pkgs[@]}"
for w in "$work"/whl/*.whl; do python3 -m zipfile -e "$w" "$work/site"; done
# the image's numpy stays (torch was built against it); trim what the workflow never loads
rm -rf "$work"/site/numpy "$work"/site/numpy.libs "$work"/site/numpy-*.dist-info "$work/site/bin" \
       "$work/site/pulp/solverdir" "$work/site/matplotlib/mpl-data/sample_data" \
       "$work/site/matplotlib/mpl-data/fonts/afm" "$work/site/matplotlib/mpl-data/fonts/pdfcorefonts"
find "$work/site/matplotlib/mpl-data/fonts/ttf" -type f ! -name 'DejaVuSans.ttf' ! -name 'DejaVuSans-Bold.ttf' ! -name 'LastResort*' -delete  # LastResort: matplotlib's fallback
find "$work/site" -type d \( -name tests -o -name __pycache__ \) -prune -exec rm -rf {} +
# llama.cpp: this checkout's build (the quantizer the workflow calls), without the CLI tools
site=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
cp -r "$site/llama_cpp" "$work/site/llama_cpp"
rm -rf "$work/site/llama_cpp/__pycache__"
# its OpenMP runtime too (the image may lack libgomp; the libraries' RUNPATH is $ORIGIN)
cp "$(ldd "$site/llama_cpp/lib/libggml-cpu.so" | awk '/libgomp/ {print $3}')" "$work/site/llama_cpp/lib/"
find "$work/site" -name '*.so*' -type f -exec strip --strip-unneeded {} + 2>/dev/null || true
tar cf - -C "$work/site" . | xz -T0 -6 > "$out"
echo "$out: $(du -h "$out" | cut -f1)"
