#!/usr/bin/env bash
# Installs openft's optional llama.cpp (llama-cpp-python, with its OpenAI-compatible
# server) into the venv PY belongs to: `make test` runs it for the export's parity
# check and serve_bench's llama.cpp peer. PyPI has only its source, a C++ build of
# minutes, so the wheel is built once and kept in CACHE; a later install (another
# clone, a new venv) takes the kept wheel. The build targets this CPU
# (GGML_NATIVE: AVX2, AVX512, AMX as present), so the cache is keyed by the CPU's
# instruction-set flags: a wheel built for an AMX CPU is never installed on an AVX2 one.
# ggml's AMX kernels are left out (-mno-amx-*, which GCC honours over -march=native):
# on AMX CPUs they segfault in the first decode of a q8_0 file (seen on a Xeon with
# amx_int8; ggml-org/llama.cpp#20824), and the export's parity check decodes q8_0.
# RECIPE names the build in the cache key, so a wheel built another way is not reused.
set -euo pipefail
py=${1:?usage: install-llamacpp.sh PYTHON SPEC [CACHE]}
spec=${2:?usage: install-llamacpp.sh PYTHON SPEC [CACHE]}
version=${spec#*==}
cpu=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | tr ' ' '\n' | grep -E '^(avx|amx|fma|f16c|sse4)' | sort | tr '\n' ' ')
recipe="native-noamx"
key=$(printf '%s %s %s' "$(uname -m)" "$cpu" "$recipe" | sha256sum | cut -c1-12)
cache=${3:-${XDG_CACHE_HOME:-$HOME/.cache}/openft/wheels}/$key
if "$py" -c "import llama_cpp, llama_cpp.server.app, sys; sys.exit(llama_cpp.__version__ != '$version')" 2>/dev/null \
  && [ "$(cat "$("$py" -c 'import llama_cpp, os; print(os.path.dirname(llama_cpp.__file__))')/OPENFT_RECIPE" 2>/dev/null)" = "$recipe" ]; then
  exit 0
fi
wheel=$(ls "$cache"/llama_cpp_python-"$version"-*.whl 2>/dev/null | head -1 || true)
if [ -z "$wheel" ]; then
  echo "llama.cpp: building $spec for this CPU (once; kept in $cache) ..."
  mkdir -p "$cache"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  noamx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
  # Only the library the bindings load: no examples, tools, tests or multimodal (llava) parts.
  # --no-cache-dir: pip keys its own wheel cache by the source, not by CMAKE_ARGS.
  CMAKE_ARGS="-DGGML_NATIVE=ON -DCMAKE_C_FLAGS='$noamx' -DCMAKE_CXX_FLAGS='$noamx' -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF" \
  CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    "$py" -m pip wheel -q --no-cache-dir --no-deps --no-binary llama-cpp-python -w "$tmp" "$spec"
  wheel=$(ls "$tmp"/llama_cpp_python-*.whl)
  mv "$wheel" "$cache/"  # whole or absent: the next install takes it
  wheel=$cache/$(basename "$wheel")
fi
"$py" -m pip install -q --force-reinstall --no-deps "$wheel"
"$py" -m pip install -q "$wheel[server]"
echo "$recipe" > "$("$py" -c 'import llama_cpp, os; print(os.path.dirname(llama_cpp.__file__))')/OPENFT_RECIPE"
