#!/usr/bin/env bash
# Every benchmark behind BENCHMARKS.md, one after another (run on an otherwise idle machine), each
# output kept verbatim in benchmarks/results/<name>.md. From the repository root:
#   bash benchmarks/run_all.sh            # all
#   bash benchmarks/run_all.sh bench_unet # one
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p benchmarks/results
declare -A CMD=(
  [bench_samplers]="python -m benchmarks.bench_samplers"
  [bench_unet]="python -m benchmarks.bench_unet --batch 128 --reps 10"
  [bench_train]="python -m benchmarks.bench_train --steps 30"
  [bench_vs_torch]="python -m benchmarks.bench_vs_torch --reps 3 --sample_reps 2"
)
names=("$@")
[ ${#names[@]} -eq 0 ] && names=(bench_samplers bench_unet bench_train bench_vs_torch)
for name in "${names[@]}"; do
  out="benchmarks/results/$name.md"
  echo "== $name: ${CMD[$name]}"
  { echo "\$ ${CMD[$name]}"; echo "($(date -u +%Y-%m-%d), git $(git rev-parse --short HEAD))"; echo;
    ${CMD[$name]} 2>/dev/null; } | tee "$out"
done
