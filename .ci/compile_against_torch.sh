#!/usr/bin/env bash
# Compiles every C++ and CUDA source against the headers of another torch release (default: the
# oldest supported, 2.11.0) without installing it: its wheel is downloaded once (no dependencies,
# kept in build/torch-wheels/) and only its include/ folder is unpacked. A torch API that differs
# between releases (autograd nodes held by shared_ptr in 2.11, intrusive_ptr in 2.13) breaks here,
# not on the first machine that builds against it. Nothing is linked or run.
# Usage: .ci/compile_against_torch.sh [version] [python]
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:-2.11.0}
py=${2:-.venv/bin/python}
cache=build/torch-wheels
mkdir -p "$cache"
wheel=$(ls "$cache"/torch-"$version"-*.whl 2>/dev/null | head -1 || true)
if [ -z "$wheel" ]; then
  "$py" -m pip download -q --no-deps --only-binary=:all: -d "$cache" "torch==$version"
  wheel=$(ls "$cache"/torch-"$version"-*.whl | head -1)
fi
headers=$(mktemp -d)
objects=$(mktemp -d)
trap 'rm -rf "$headers" "$objects"' EXIT
"$py" - "$wheel" "$headers" <<'EOF'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as wheel:
    for name in wheel.namelist():
        if name.startswith(("torch/include/", "torch/version.py")):
            wheel.extract(name, sys.argv[2])
EOF
include=$headers/torch/include
echo "torch headers of $(grep -m1 '^__version__' "$headers/torch/version.py")"
python_include=$("$py" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
pybind11_include=$("$py" -c "import pybind11; print(pybind11.get_include())")
# As the CMake build compiles them (torch's wheels use the C++11 ABI).
flags=(-std=c++17 -O1 -fPIC -fopenmp -Wno-psabi -D_GLIBCXX_USE_CXX11_ABI=1 -DTORCH_EXTENSION_NAME=_C
       -isystem "$include" -isystem "$include/torch/csrc/api/include"
       -isystem "$python_include" -isystem "$pybind11_include")
pids=()
for source in csrc/*.cpp csrc/cpu/*.cpp; do
  echo "g++: $source"
  g++ -c "$source" -o "$objects/$(basename "$source").o" "${flags[@]}" &
  pids+=($!)
  # Two at a time.
  if [ ${#pids[@]} -ge 2 ]; then wait "${pids[0]}"; pids=("${pids[@]:1}"); fi
done
for pid in "${pids[@]}"; do wait "$pid"; done
if command -v "${NVCC:-nvcc}" >/dev/null; then
  for source in csrc/cuda/*.cu; do
    echo "nvcc: $source (sm_90)"
    "${NVCC:-nvcc}" -c "$source" -o "$objects/$(basename "$source").o" -std=c++17 -O1 \
      --expt-relaxed-constexpr -gencode arch=compute_90,code=sm_90 -Xcompiler -fPIC \
      -D_GLIBCXX_USE_CXX11_ABI=1 -DFUSED_NCE_WITH_CUDA \
      -isystem "$include" -isystem "$include/torch/csrc/api/include"
  done
else
  echo "nvcc not found: CUDA sources not compiled against torch $version"
fi
echo "every source compiles against torch $version"
