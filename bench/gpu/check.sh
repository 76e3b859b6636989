#!/usr/bin/env bash
# One run on a GPU machine (Hopper, torch with CUDA, no network): build for sm_90, the CUDA tests,
# compute-sanitizer over every path, the benchmark at the target shapes. Everything goes to OUTDIR
# (logs, CSVs), with a kernel-by-kernel profile of one step, the host's share of a step against a
# CUDA graph replay, and ncu on the row-sum kernel.
# Usage: bench/gpu/check.sh OUTDIR [quick]
# Plot the side by side afterwards, where matplotlib is: bench/plot_side_by_side.py OUTDIR/side_by_side.csv
set -uo pipefail
out=${1:?usage: bench/gpu/check.sh OUTDIR [quick]}
quick=${2:-}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 CUBLAS_WORKSPACE_CONFIG=:4096:8
py=${PYTHON:-python3}
cd "$(dirname "$0")/../.."
log() { echo "== $(date -u +%T) $*" | tee -a "$out/check.log"; }
# The whole run stays inside BUDGET seconds (default 8 minutes): each step gets its own limit or
# what is left, whichever is less, so a slow step cuts the later ones short instead of the machine
# cutting the run off (every step writes its results as it goes).
deadline=$((SECONDS + ${BUDGET:-480}))
limit() { local left=$((deadline - SECONDS)); echo $(( $1 < left ? $1 : (left > 10 ? left : 10) )); }

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } \
  | tee "$out/device.txt"

log "build (sm_90, 16 jobs)"
export TORCH_CUDA_ARCH_LIST=9.0 CMAKE_BUILD_PARALLEL_LEVEL=16
# torch's CMake finds the toolkit from CUDA_TOOLKIT_ROOT_DIR; name it where nvcc is not in it.
cuda_root=${CUDA_HOME:-$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")}
[ -e "$cuda_root/include/cuda_runtime.h" ] || cuda_root=/usr/local/cuda
echo "CUDA toolkit: $cuda_root" | tee -a "$out/check.log"
if ! "$py" -m pip install -q --no-build-isolation --no-deps \
     -C cmake.define.FUSED_NCE_CUDA=ON -C cmake.define.CMAKE_CUDA_ARCHITECTURES=90 \
     -C cmake.define.CUDA_TOOLKIT_ROOT_DIR="$cuda_root" \
     -C cmake.define.CMAKE_CUDA_COMPILER="$cuda_root/bin/nvcc" . \
     > "$out/build.log" 2>&1; then
  tail -40 "$out/build.log"; log "build failed"; exit 1
fi
"$py" -c "import torch, fused_nce; torch.ops.fused_nce.sampled_loss_forward.default" || exit 1
# How the module is linked: its libraries, and how many symbols it exports (a few dozen; thousands
# would mean a static libstdc++ leaking out of it).
so=$("$py" -c "import fused_nce._C as m; print(m.__file__)")
{ g++ --version | head -1; echo "LDFLAGS=${LDFLAGS:-}"; readelf -d "$so" | grep NEEDED
  echo "exported symbols: $(nm -D --defined-only "$so" | wc -l)"; } | tee "$out/linkage.txt"

log "CUDA tests (every test's cuda case; the first failures' tracebacks)"
# The CUDA-only files first, torch.compile's last (its compiles are the slow ones).
per_test=$("$py" -c "import pytest_timeout" 2>/dev/null && echo "--timeout=90")
timeout "$(limit 200)" "$py" -m pytest -q -p no:cacheprovider --maxfail=6 --tb=short -rf $per_test \
  tests/test_cuda.py tests/test_cuda_graphs.py tests/test_inputs.py tests/test_sparse.py \
  tests/test_losses.py tests/test_sampler.py tests/test_determinism.py tests/test_optim.py \
  tests/test_retrieval.py tests/test_autocast.py tests/test_utils.py tests/test_module.py \
  tests/test_distributed.py tests/test_compile.py -k "cuda or carry_their_numbers" 2>&1 | tee "$out/tests.log" | tail -40
tests_rc=${PIPESTATUS[0]}
log "tests rc=$tests_rc"

log "compute-sanitizer memcheck"
timeout "$(limit 100)" compute-sanitizer --tool memcheck --error-exitcode 9 \
  "$py" bench/gpu/sanitize_driver.py > "$out/memcheck.log" 2>&1
log "memcheck rc=$?: $(grep 'ERROR SUMMARY' "$out/memcheck.log")"
tail -3 "$out/memcheck.log"

# Beside the fused losses, the careful PyTorch a user writes (bench/baselines.py): eager,
# torch.compile (default and max-autotune-no-cudagraphs, compile times in the CSV's note) and
# F.embedding(sparse=True), each checked against the fused loss before it is timed.
log "benchmark: N=8192 D=1024 k=64 V=1e6 bfloat16 (per-example)"
timeout "$(limit 150)" "$py" bench/bench_losses.py --n 8192 --dim 1024 --k 64 --num-classes 1000000 \
  --dtype bfloat16 --modes per_example --objectives nce --repeats 20 \
  --draws 67108864 --build-classes 10000000 \
  --csv "$out/bench_per_example.csv" 2>&1 | tee "$out/bench_per_example.log" | tail -12
log "benchmark: shared negatives k=1024"
timeout "$(limit 150)" "$py" bench/bench_losses.py --n 8192 --dim 1024 --shared-k 1024 \
  --num-classes 1000000 --dtype bfloat16 --modes shared --objectives nce sampled_softmax \
  --repeats 20 --no-full-softmax --csv "$out/bench_shared.csv" 2>&1 \
  | tee "$out/bench_shared.log" | tail -10
log "benchmark: in-batch N=8192"
timeout "$(limit 60)" "$py" bench/bench_losses.py --n 8192 --dim 1024 --num-classes 1000000 \
  --dtype bfloat16 --modes in_batch --repeats 20 --no-full-softmax \
  --csv "$out/bench_in_batch.csv" 2>&1 | tee "$out/bench_in_batch.log" | tail -6
log "benchmark: several positives and hard negatives (T=4, k=64, h=16)"
timeout "$(limit 60)" "$py" bench/bench_positives_and_hard.py --n 8192 --dim 1024 \
  --num-classes 1000000 --dtype bfloat16 --repeats 20 \
  --csv "$out/bench_positives_and_hard.csv" 2>&1 | tee "$out/bench_positives_and_hard.log" | tail -7
log "profile: one step, kernel by kernel"
timeout "$(limit 45)" "$py" bench/gpu/profile_step.py > "$out/profile.log" 2>&1
log "profile rc=$?"
log "host time: eager step, its issue time, CUDA graph replay"
timeout "$(limit 45)" "$py" bench/gpu/host_overhead.py --csv "$out/host_overhead.csv" 2>&1 \
  | tee "$out/host_overhead.log" | tail -5
log "side by side: full-softmax libraries, V = 256k and 1e6"
# Liger and Cut Cross-Entropy travel as wheels in the ignored .whl/ (no network there).
site=$(mktemp -d)
if ls .whl/*.whl > /dev/null 2>&1; then
  "$py" -m pip install -q --no-index --no-deps --target "$site" .whl/*.whl > "$out/wheels.log" 2>&1
fi
PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" timeout "$(limit 120)" "$py" bench/bench_full_softmax_libs.py \
  --csv "$out/side_by_side.csv" 2>&1 | tee "$out/side_by_side.log" | tail -16
log "ncu: the row-sum kernel of the per-example backward"
timeout "$(limit 40)" ncu --kernel-name regex:sum_chunks --launch-skip 3 --launch-count 1 \
  --section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats \
  "$py" bench/gpu/profile_step.py --plain > "$out/ncu.log" 2>&1
log "ncu rc=$?"
if [ -z "$quick" ]; then
  log "compute-sanitizer racecheck"
  timeout "$(limit 120)" compute-sanitizer --tool racecheck --error-exitcode 9 \
    "$py" bench/gpu/sanitize_driver.py > "$out/racecheck.log" 2>&1
  log "racecheck rc=$?: $(grep 'RACECHECK SUMMARY' "$out/racecheck.log")"
  tail -3 "$out/racecheck.log"
fi
log "done"
