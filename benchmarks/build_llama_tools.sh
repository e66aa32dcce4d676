#!/usr/bin/env bash
# Build llama.cpp's llama-imatrix and llama-quantize command-line tools (not in the llama-cpp-python
# wheel) from the llama.cpp vendored in llama-cpp-python's source distribution, so the tools and the
# Python binding are the same llama.cpp. Portable flags as in .ci/install-llama (AVX2, no AVX-512, no
# AMX), static libraries, so the binaries stand alone. Cached under ~/.cache/compress/ keyed by version
# and flags; prints the folder holding the two binaries on its last line.
#
#   bash benchmarks/build_llama_tools.sh [UNPACKED_SDIST]   # without it, pip downloads the sdist
set -euo pipefail

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
FLAGS="-DGGML_NATIVE=OFF -DGGML_CPU_ALL_VARIANTS=OFF -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON"
FLAGS="$FLAGS -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX_VNNI=OFF -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF"
FLAGS="$FLAGS -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF"
FLAGS="$FLAGS -DGGML_AMX_BF16=OFF"
# only what the two tools need: no server, tests, examples, HTTPS
FLAGS="$FLAGS -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF"
FLAGS="$FLAGS -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF -DCMAKE_BUILD_TYPE=Release"
JOBS="${JOBS:-2}"

key="$(printf '%s %s' "$VERSION" "$FLAGS" | sha256sum | cut -c1-16)"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/compress/llama-tools-$VERSION-$key"
if [ -x "$cache/llama-imatrix" ] && [ -x "$cache/llama-quantize" ]; then
    echo "$cache"
    exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
src="${1:-}"
if [ -z "$src" ]; then
    pip download "llama-cpp-python==$VERSION" --no-deps --no-binary :all: -d "$work" >&2
    tar -xzf "$work"/llama_cpp_python-"$VERSION".tar.gz -C "$work"
    src="$work/llama_cpp_python-$VERSION"
fi
llama="$src/vendor/llama.cpp"
[ -f "$llama/CMakeLists.txt" ] || { echo "no llama.cpp source at $llama" >&2; exit 2; }

echo "building llama-imatrix and llama-quantize $VERSION (portable AVX2 build, $JOBS jobs)" >&2
# shellcheck disable=SC2086
nice -n 19 cmake -S "$llama" -B "$work/build" $FLAGS >&2
nice -n 19 cmake --build "$work/build" --target llama-imatrix llama-quantize -j"$JOBS" >&2
mkdir -p "$cache.tmp"
cp "$work/build/bin/llama-imatrix" "$work/build/bin/llama-quantize" "$cache.tmp/"
rm -rf "$cache"
mv "$cache.tmp" "$cache"
echo "$cache"
