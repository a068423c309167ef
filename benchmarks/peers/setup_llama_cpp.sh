#!/usr/bin/env bash
# Benchmark-only: build llama.cpp's own `llama-server` from the llama.cpp sources vendored in the
# llama-cpp-python sdist on PyPI (no git, no network beyond PyPI). Never a product dependency.
# Output: benchmarks/peers/_build/llama-server (gitignored). About 5 minutes on 2 cores.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="$here/_build"
version="${LLAMA_CPP_PYTHON_VERSION:-}"
py="${PYTHON:-python3}"
if [ -x "$out/llama-server" ]; then
  echo "llama-server already built: $out/llama-server"
  exit 0
fi
mkdir -p "$out/src"
cd "$out/src"
spec="llama-cpp-python${version:+==$version}"
# pip prepares an sdist's metadata even for `download`, which needs its build backend.
"$py" -m venv "$out/venv"
"$out/venv/bin/pip" install -q scikit-build-core >/dev/null
"$out/venv/bin/pip" download -q --no-deps --no-binary :all: --no-build-isolation -d . "$spec" >/dev/null
sdist="$(ls -t llama_cpp_python-*.tar.gz | head -n1)"
tar xzf "$sdist"
src="$(ls -d llama_cpp_python-*/vendor/llama.cpp | head -n1)"
cmake -S "$src" -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DBUILD_SHARED_LIBS=OFF >/dev/null
cmake --build build --target llama-server -j"$(nproc)" >/dev/null
cp build/bin/llama-server "$out/llama-server"
echo "built $out/llama-server from $sdist"
