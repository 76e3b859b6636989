#!/usr/bin/env bash
# Compiles every CUDA source for sm_80 and sm_90 with the local nvcc against the installed torch's
# headers (no GPU, and no CUDA torch, needed). Usage: .ci/compile_cuda.sh [python]
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-.venv/bin/python}
nvcc=${NVCC:-nvcc}
torch_dir=$("$py" -c "import os, torch; print(os.path.dirname(torch.__file__))")
abi=$("$py" -c "import torch; print(int(torch.compiled_with_cxx11_abi()))")
# A CPU build of torch ships the c10/cuda headers but not their generated config header, which only
# sets an export macro for Windows DLLs: skip it.
no_config=$("$py" -c "import os, torch; print(int(not os.path.exists(os.path.join(os.path.dirname(torch.__file__), 'include/c10/cuda/impl/cuda_cmake_macros.h'))))")
defines=(-DFUSED_NCE_WITH_CUDA)
[ "$no_config" = 1 ] && defines+=(-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE)
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for source in csrc/cuda/*.cu; do
  echo "nvcc: $source (sm_80, sm_90)"
  "$nvcc" -c "$source" -o "$out/$(basename "$source").o" -std=c++17 -O3 --expt-relaxed-constexpr \
    -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
    -Xcompiler -fPIC -D_GLIBCXX_USE_CXX11_ABI="$abi" "${defines[@]}" \
    -isystem "$torch_dir/include" -isystem "$torch_dir/include/torch/csrc/api/include"
done
