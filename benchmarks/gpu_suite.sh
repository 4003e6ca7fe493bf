#!/usr/bin/env bash
# The GPU suite on a machine without a package index (BENCHMARKS.md, "GPU suite"): installs the
# carried wheels (.whl/, from benchmarks/gpu_wheels.sh) whose module python3 cannot find, into
# $SITE (default /tmp/site; --no-index --no-deps), then runs benchmarks/gpu_suite.py with the given arguments,
# its log kept next to its stored outputs ($OUT when set, else benchmarks/results/gpu/).
#   bash benchmarks/gpu_suite.sh                      # everything, on the GPU machine
#   bash benchmarks/gpu_suite.sh --parts finetune     # one part again
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}   # where the missing carried wheels go (first on PYTHONPATH)
# module:wheel-name prefix of each carried wheel
MODS="diffusers:diffusers ml_collections:ml_collections importlib_metadata:importlib_metadata
flax:flax optax:optax orbax.checkpoint:orbax_checkpoint chex:chex"
missing=$("$PY" - "$MODS" <<'EOF'
import importlib.util, sys
for pair in sys.argv[1].split():
    mod, whl = pair.split(":")
    top = importlib.util.find_spec(mod.split(".")[0])
    if top is None or ("." in mod and importlib.util.find_spec(mod) is None):
        print(whl)
EOF
)
if [ -n "$missing" ]; then
  wheels=()
  for w in $missing; do
    f=$(ls .whl/"$w"-*.whl 2>/dev/null | head -n 1)
    if [ -z "$f" ]; then echo "!! $w is missing here and no .whl/$w-*.whl was carried"; continue; fi
    wheels+=("$f")
  done
  if [ ${#wheels[@]} -gt 0 ]; then
    echo "installing carried wheels: ${wheels[*]}"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
      "${wheels[@]}" || exit 1
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
  fi
fi
out=${OUT:-benchmarks/results/gpu}
mkdir -p "$out"
PYTHONUNBUFFERED=1 "$PY" -m benchmarks.gpu_suite "$@" 2>&1 | tee "$out/gpu_suite.log"
exit "${PIPESTATUS[0]}"
