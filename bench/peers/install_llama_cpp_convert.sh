#!/usr/bin/env bash
# llama.cpp's own HF -> GGUF converter is a client of our exports, never a dependency. It
# comes from the llama-cpp-python 0.3.36 source distribution (the llama.cpp it vendors, so the
# converter and its gguf-py match), unpacked under bench/.peers/llama-cpp/ (git-ignored), and
# runs in the transformers 4.57 venv (the version its requirements pin; install that first
# with bench/peers/install_transformers4.sh) plus sentencepiece, which it imports. Only the
# Python converter: building llama.cpp itself takes an hour here. Idempotent.
# tests/test_clients.py uses it:
#   PYTHONPATH=bench/.peers/llama-cpp/gguf-py bench/.peers/transformers4/bin/python \
#       bench/.peers/llama-cpp/convert_hf_to_gguf.py MODEL_DIR --outfile M.gguf --outtype f32
set -euo pipefail
cd "$(dirname "$0")/../.."
LC=bench/.peers/llama-cpp
T4=bench/.peers/transformers4
VERSION=0.3.36
if [ -f "$LC/VERSION" ] && [ "$(cat "$LC/VERSION")" = "$VERSION" ] && "$T4/bin/python" -c "import sentencepiece" 2>/dev/null; then
  echo "llama.cpp converter ($VERSION) already installed"; exit 0
fi
[ -x "$T4/bin/python" ] || { echo "run bash bench/peers/install_transformers4.sh first (the converter pins transformers 4.57)" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$T4/bin/pip" download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$tmp"
tar -xzf "$tmp/llama_cpp_python-$VERSION.tar.gz" -C "$tmp"
src="$tmp/llama_cpp_python-$VERSION/vendor/llama.cpp"
rm -rf "$LC"
mkdir -p "$LC"
cp -r "$src/convert_hf_to_gguf.py" "$src/conversion" "$src/gguf-py" "$src/LICENSE" "$LC/"
"$T4/bin/pip" install -q "sentencepiece>=0.1.98,<0.3.0"
echo "$VERSION" > "$LC/VERSION"
PYTHONPATH="$LC/gguf-py" "$T4/bin/python" "$LC/convert_hf_to_gguf.py" --help > /dev/null
echo "llama.cpp converter from llama-cpp-python $VERSION in $LC"
