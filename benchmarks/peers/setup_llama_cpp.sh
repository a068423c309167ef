#!/usr/bin/env bash
# Benchmark-only: build llama.cpp's own `llama-server` from the llama.cpp sources vendored in the
# llama-cpp-python sdist on PyPI (no git, no network beyond PyPI). Never a product dependency.
#
# ggml is built with GGML_NATIVE=OFF and explicit instruction-set options chosen from this host's
# /proc/cpuinfo by benchmarks/host_info.py (AMX always off: -march=native turned AMX on for Xeons
# that report it, and that binary died with SIGILL in libggml-cpu at warm-up).
# Each flag set gets its own build, benchmarks/peers/_build/<key>/, keyed by the options, holding
# llama-server and build_flags.txt (the options, the CPU it was built on, the sdist); a host whose
# CPU needs other options builds anew instead of reusing a binary made for another CPU.
# benchmarks/peers/_build/llama-server is a symlink to this host's build (all gitignored).
# No web UI (LLAMA_USE_PREBUILT_UI=OFF: the build would otherwise try to fetch it from Hugging
# Face); the benchmark only uses the HTTP API. About 5 minutes on 2 cores.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="$here/_build"
version="${LLAMA_CPP_PYTHON_VERSION:-}"
py="${PYTHON:-python3}"
host_info="$here/../host_info.py"  # standard library only: runs under any python3

opts_text="$("$py" "$host_info" --cmake-flags)"  # fails the script (set -e) if python does
mapfile -t ggml_opts <<<"$opts_text"
key="$("$py" "$host_info" --build-key)${version:+-v$version}"
dest="$out/$key"
if [ -x "$dest/llama-server" ] && [ -f "$dest/build_flags.txt" ]; then
  ln -sfn "$key/llama-server" "$out/llama-server"
  echo "llama-server already built for these flags: $dest/llama-server"
  exit 0
fi

mkdir -p "$out/src" "$dest"
cd "$out/src"
if [ -n "$version" ]; then
  sdist="llama_cpp_python-$version.tar.gz"
else
  sdist="$(ls -t llama_cpp_python-*.tar.gz 2>/dev/null | head -n1 || true)"
fi
if [ -z "$sdist" ] || [ ! -f "$sdist" ]; then
  spec="llama-cpp-python${version:+==$version}"
  # pip prepares an sdist's metadata even for `download`, which needs its build backend.
  [ -x "$out/venv/bin/pip" ] || "$py" -m venv "$out/venv"
  "$out/venv/bin/pip" install -q scikit-build-core >/dev/null
  "$out/venv/bin/pip" download -q --no-deps --no-binary :all: --no-build-isolation -d . "$spec" >/dev/null
  sdist="$(ls -t llama_cpp_python-*.tar.gz | head -n1)"
fi
srcdir="${sdist%.tar.gz}"
[ -d "$srcdir/vendor/llama.cpp" ] || tar xzf "$sdist"
src="$out/src/$srcdir/vendor/llama.cpp"

build="$dest/build"
rm -rf "$build"
cmake -S "$src" -B "$build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
  "${ggml_opts[@]}" >"$dest/cmake-configure.log" 2>&1 || { tail -n 40 "$dest/cmake-configure.log" >&2; exit 1; }
# The options must have taken: no -march=native and no AMX in ggml-cpu's compile flags.
cpu_flags_make="$(find "$build/ggml" -path '*ggml-cpu.dir/flags.make' | head -n1)"
if [ -z "$cpu_flags_make" ] || grep -qE -- '-march=native|-mamx' "$cpu_flags_make"; then
  echo "ggml-cpu compile flags are not the explicit set (see $cpu_flags_make)" >&2
  exit 1
fi
cmake --build "$build" --target llama-server -j"$(nproc)" >"$dest/cmake-build.log" 2>&1 \
  || { tail -n 40 "$dest/cmake-build.log" >&2; exit 1; }
cp "$build/bin/llama-server" "$dest/llama-server.tmp"
{
  echo "# llama-server built by benchmarks/peers/setup_llama_cpp.sh; key $key"
  echo "# sdist: $sdist"
  echo "# built on: $("$py" "$host_info" --describe)"
  echo "# ggml-cpu compile flags: $(grep -E '^(C|CXX)_FLAGS' "$cpu_flags_make" | grep -oE -- '-m[a-z0-9.-]+' | sort -u | tr '\n' ' ')"
  printf '%s\n' "${ggml_opts[@]}"
} >"$dest/build_flags.txt"
mv "$dest/llama-server.tmp" "$dest/llama-server"  # last: a half-done build is never taken as done
ln -sfn "$key/llama-server" "$out/llama-server"
echo "built $dest/llama-server from $sdist with: ${ggml_opts[*]}"
