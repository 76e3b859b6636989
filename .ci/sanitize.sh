#!/usr/bin/env bash
# ./dev.sh sanitize: builds fused_nce with AddressSanitizer + UndefinedBehaviorSanitizer into the
# venv given as $1 (dev.sh passes .venv-sanitize, made like .venv, so .venv keeps the normal build)
# and runs the CPU tests on it. Any sanitizer report, in pytest or in a process it starts, fails the
# run. Further arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
py=$1
shift

# Its own build dir, so the normal build's cache is untouched; RelWithDebInfo and no strip keep the
# symbols and lines the reports print. FUSED_NCE_SANITIZE (CMakeLists.txt) adds the flags, CPU only.
"$py" -m pip install -q --no-build-isolation --no-deps \
  -C build-dir=build/sanitize -C cmake.build-type=RelWithDebInfo -C install.strip=false \
  -C cmake.define.FUSED_NCE_SANITIZE=ON .

# Python and torch are not instrumented, so the ASan runtime is preloaded: it must be the first
# library in the process. libstdc++ is preloaded with it: Python does not link libstdc++, so when the
# runtime starts it finds no __cxa_throw to wrap, and the first C++ exception (torch throws and
# catches some, e.g. in opcheck) aborts with "CHECK failed: real___cxa_throw != 0". Both are the
# libraries the module was linked against. Processes the tests start (the distributed tests' ranks,
# a forked child, the examples) inherit LD_PRELOAD and the options below. It is set for pytest only,
# not for this script's own commands (uninstrumented tools would run under the runtime too).
purelib=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
module=$(ls "$purelib"/fused_nce/_C*.so)
libasan=$(ldd "$module" | awk '/libasan\.so/ {print $3}')
libstdcxx=$(ldd "$module" | awk '/libstdc\+\+\.so/ {print $3}')
if [ ! -e "$libasan" ] || [ ! -e "$libstdcxx" ]; then
  echo "sanitize: $module is not linked against libasan and libstdc++" >&2
  exit 1
fi
preload="$libasan $libstdcxx"
# detect_leaks=0: LeakSanitizer would list what CPython and torch hold until exit (interned objects,
# registries, thread pools), none of it fused_nce's. Every other ASan error aborts the process.
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1
# -fno-sanitize-recover=undefined already stops at the first UB report; these say so at run time too.
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
# This build has no CUDA kernels: the tests see no GPU (on a GPU machine they would test "cuda").
export CUDA_VISIBLE_DEVICES=

# Every test module except those that run no kernel of the build or only repeat them slowly:
# - test_docs.py: the documentation's code blocks and the README's length (documentation, not
#   kernels; the same calls are in the tests below);
# - test_examples.py: a few training steps of each example script, minutes long even unsanitized,
#   through the same ops the tests below check one by one;
# - test_typing.py: annotations of the Python API (no native code);
# - test_cuda.py, test_cuda_graphs.py: CUDA only (skipped here anyway).
# --capture=sys: pytest captures Python's output only, so a report written to fd 2 by a process that
# then aborts (pytest itself or a rank it spawned) reaches the log instead of a discarded capture.
# The log is searched afterwards as well: a report fails the run even where a test does not check
# the exit code of the process that printed it.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
LD_PRELOAD=$preload "$py" -m pytest -p no:cacheprovider --capture=sys tests \
  --ignore=tests/test_docs.py --ignore=tests/test_examples.py --ignore=tests/test_typing.py \
  --ignore=tests/test_cuda.py --ignore=tests/test_cuda_graphs.py "$@" 2>&1 | tee "$log" \
  || status=$?
if grep -Eq '^==[0-9]+==ERROR: (Address|UndefinedBehavior)Sanitizer|: runtime error: |Sanitizer: CHECK failed' "$log"; then
  echo "sanitize: FAILED, a sanitizer reported the errors above" >&2
  exit 1
fi
exit "$status"
