#!/usr/bin/env bash
# Build the llama.cpp that the `llamacpp` tests run against, outside the repository (none of its code is committed).
#
#   scripts/build_llamacpp.sh /work/llama        # ~10 minutes on 2 cores
#   LLAMA_CPP_DIR=/work/llama/src .venv/bin/python -m pytest -q -m llamacpp tests
#
# The source is the llama.cpp tree bundled in the llama-cpp-python sdist on PyPI (it supports gemma4). Two
# changes from a stock build, both for tight logit comparisons:
#   * GGML_GELU_FP16 is undefined: the stock CPU backend computes GELU from an fp16 table (~1e-2 off);
#   * static libraries (BUILD_SHARED_LIBS=OFF): tests/export/llamacpp_logits.cpp links against them.
# The tests themselves give llama.cpp an F32 KV cache and flash attention off (its CPU path rounds to f16).
set -euo pipefail
DEST="${1:?usage: scripts/build_llamacpp.sh DEST_DIR}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$DEST"
cd "$DEST"
if [ ! -d src ]; then
    "$PYTHON" -m pip download --no-deps --no-binary :all: llama-cpp-python -d sdist
    tar xzf sdist/llama_cpp_python-*.tar.gz
    mv llama_cpp_python-*/vendor/llama.cpp src
    rm -rf llama_cpp_python-*/
fi
VEC=src/ggml/src/ggml-cpu/vec.h
sed -i 's|^#define GGML_GELU_FP16$|// #define GGML_GELU_FP16  (off: exact GELU, scripts/build_llamacpp.sh)|' "$VEC"
if grep -q '^#define GGML_GELU_FP16$' "$VEC"; then
    echo "could not undefine GGML_GELU_FP16 in $DEST/$VEC" >&2
    exit 1
fi
cmake -S src -B src/build -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release \
    -DLLAMA_BUILD_TESTS=OFF
cmake --build src/build -j"$(nproc)" --target llama-quantize llama-perplexity llama-tokenize llama
echo "built: LLAMA_CPP_DIR=$DEST/src"
