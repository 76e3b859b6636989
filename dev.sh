#!/usr/bin/env bash
# One command from a fresh clone: makes .venv (sees a system torch if there is one, else installs
# the CPU wheel torch==2.13.0), builds fused_nce without build isolation, then runs
#   ./dev.sh test  [pytest args]      the test suite
#   ./dev.sh bench [benchmark args]   the microbenchmark (prints a table, writes a CSV)
#   ./dev.sh docs  [mkdocs args]      the documentation site, built strictly into site/
#   ./dev.sh sanitize [pytest args]   the CPU kernel tests on a build with AddressSanitizer and
#                                     UndefinedBehaviorSanitizer (own venv .venv-sanitize and build
#                                     dir build/sanitize; .venv keeps the normal build); any report
#                                     fails the run. What it runs and why: .ci/sanitize.sh.
set -euo pipefail
cd "$(dirname "$0")"

command=${1:-test}
shift || true

venv=${FUSED_NCE_VENV:-.venv}
if [ "$command" = sanitize ]; then
  venv=${FUSED_NCE_SANITIZE_VENV:-.venv-sanitize}
fi
if [ ! -x "$venv/bin/python" ]; then
  "${PYTHON:-python3}" -m venv --system-site-packages "$venv"
fi
py="$venv/bin/python"

if [ "$command" = docs ]; then
  # The API pages are read from the sources (python/), so the docs need neither torch nor a
  # build of the extension: only their own tools.
  if ! "$py" -c "import mkdocs, material, mkdocstrings, mkdocstrings_handlers.python" \
      2>/dev/null; then
    "$py" -m pip install -q mkdocs mkdocs-material "mkdocstrings[python]"
  fi
  # NO_MKDOCS_2_WARNING: mkdocs-material's banner about future versions, not about this site.
  NO_MKDOCS_2_WARNING=1 exec "$py" -m mkdocs build --strict --site-dir site "$@"
fi

if ! "$py" -c "import torch" 2>/dev/null; then
  "$py" -m pip install -q "torch==2.13.0"
fi
if ! "$py" -c "import pybind11, scikit_build_core, ninja, pytest, numpy, mypy, matplotlib, tqdm, \
    hypothesis" 2>/dev/null; then
  # matplotlib and tqdm: the examples' plots and progress bars; hypothesis: the property tests.
  "$py" -m pip install -q pybind11 "scikit-build-core>=0.10" ninja pytest numpy mypy matplotlib \
    tqdm hypothesis
fi
if [ "$command" = sanitize ]; then
  exec .ci/sanitize.sh "$py" "$@"
fi
# --no-build-isolation: build against the torch above, never a freshly downloaded one.
"$py" -m pip install -q --no-build-isolation --no-deps .

case "$command" in
  test) exec "$py" -m pytest tests "$@" ;;
  bench) exec "$py" bench/bench_losses.py "$@" ;;
  *) echo "usage: ./dev.sh test|bench|docs|sanitize [args]" >&2; exit 2 ;;
esac
