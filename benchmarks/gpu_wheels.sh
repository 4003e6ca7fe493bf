#!/usr/bin/env bash
# The carried wheels of the GPU suite (BENCHMARKS.md, "GPU suite"): downloads, on a machine with a
# package index, the pure-Python wheels that the GPU machine (no package index; JAX with CUDA,
# PyTorch, transformers, ... installed) may lack, into .whl/ (git-ignored), at the versions this
# environment runs its tests with. benchmarks/gpu_suite.sh installs on the GPU machine only those
# whose module it cannot find there, with --no-index --no-deps.
#   bash benchmarks/gpu_wheels.sh                    # from the repository root
#   PYTHON=/path/to/venv/python DEST=.whl bash benchmarks/gpu_wheels.sh
# Every dependency of these wheels that the GPU image lacks must be in the list too (--no-deps):
# diffusers needs importlib_metadata (absent there); ml_collections needs absl-py and PyYAML
# (present); flax / optax / orbax-checkpoint / chex are there already and only travel in case an
# image lacks them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
DEST=${DEST:-.whl}
PYVER=${PYVER:-3.12}   # the GPU machine's python3
PKGS=(diffusers ml_collections importlib_metadata flax optax orbax-checkpoint chex)
specs=()
for p in "${PKGS[@]}"; do
  v=$("$PY" -c "import importlib.metadata as m; print(m.version('$p'))") || {
    echo "error: $p is not installed in $PY (its version is the one carried)" >&2; exit 2; }
  specs+=("$p==$v")
done
rm -rf "$DEST"
mkdir -p "$DEST"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" \
  --implementation cp --platform manylinux2014_x86_64 -d "$DEST" "${specs[@]}"
for w in "$DEST"/*.whl; do
  case "$w" in *-none-any.whl) ;; *) echo "error: $w is not a pure-Python wheel" >&2; exit 1;; esac
done
echo "${specs[*]}"
du -sh "$DEST"
