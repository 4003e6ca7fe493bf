#!/usr/bin/env bash
# Every benchmark behind BENCHMARKS.md, one after another (run on an otherwise idle machine), each
# output kept verbatim in benchmarks/results/<profile>/<name>.md. From the repository root:
#   bash benchmarks/run_all.sh                 # all, profile picked from the machine (cpu or gpu)
#   bash benchmarks/run_all.sh bench_unet      # one
#   PROFILE=gpu bash benchmarks/run_all.sh     # force a profile
# The gpu profile uses larger batches (a 28x28 model at batch 128 leaves a GPU mostly idle) and
# adds bf16 and torch.compile runs.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PROFILE:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then PROFILE=gpu
  else PROFILE=cpu; fi
fi
PY=${PYTHON:-python}   # PYTHON=python3 where there is no `python`
declare -A CMD
if [ "$PROFILE" = gpu ]; then
  CMD=(
    [bench_samplers]="$PY -m benchmarks.bench_samplers --batch 256"
    [bench_unet]="$PY -m benchmarks.bench_unet --batch 128 --reps 20"
    [bench_unet_b1024]="$PY -m benchmarks.bench_unet --batch 1024 --reps 20"
    [bench_unet_b1024_bf16]="$PY -m benchmarks.bench_unet --batch 1024 --reps 20 --dtype bfloat16"
    [bench_train]="$PY -m benchmarks.bench_train --steps 200"
    [bench_train_accel]="$PY -m benchmarks.bench_train --config accel --steps 100"
    [bench_compile_cache]="$PY -m benchmarks.bench_compile_cache"
    [bench_vs_torch]="$PY -m benchmarks.bench_vs_torch --model preset --reps 20 --sample_reps 5 --torch_compile"
  )
  default=(bench_samplers bench_unet bench_unet_b1024 bench_unet_b1024_bf16 bench_train
           bench_train_accel bench_vs_torch bench_compile_cache)
else
  CMD=(
    [bench_samplers]="$PY -m benchmarks.bench_samplers"
    [bench_unet]="$PY -m benchmarks.bench_unet --batch 128 --reps 10"
    [bench_train]="$PY -m benchmarks.bench_train --steps 30"
    [bench_vs_torch]="$PY -m benchmarks.bench_vs_torch --reps 3 --sample_reps 3 --torch_compile"
    [bench_cpu_options]="$PY -m benchmarks.bench_cpu_options"
    [bench_compile_cache]="$PY -m benchmarks.bench_compile_cache"
    # one core and one torch thread: robust on a shared machine (see the script's docstring)
    [bench_finetune]="$PY -m benchmarks.bench_finetune --cpus 1"
    [bench_finetune_all_cpus]="$PY -m benchmarks.bench_finetune"
    [profile_step]="$PY -m benchmarks.profile_step --top 20"
    [profile_step_xla_defaults]="env JAXDIFF_CPU_COMPILER_OPTIONS=0 $PY -m benchmarks.profile_step"
    # not in the default list: today's counterpart of results/cpu/history/bench_vs_torch_ae40e27.md
    [bench_vs_torch_xla_defaults]="env JAXDIFF_CPU_COMPILER_OPTIONS=0 $PY -m benchmarks.bench_vs_torch --reps 3 --sample_reps 3 --torch_compile"
    # not in the default list: the 2.6B-parameter SDXL UNet, ~11 GB of RAM; run on an idle machine
    [bench_sdxl_unet]="$PY -m benchmarks.bench_sdxl_unet --reps 3"
    # not in the default list: every convolution of four models per shape (run on an idle machine),
    # and the SD 1.5 UNet's forward+backward under two im2col rules (~20 GB of RAM at its peak)
    [bench_conv_shapes]="$PY -m benchmarks.bench_conv_shapes"
    [bench_conv_shapes_unet_ab]="$PY -m benchmarks.bench_conv_shapes --models= --step_batches= --unet_ab sd15 --reps 5 --no_torch"
    # not in the default list: a ControlNet + UNet step against a UNet step, jaxdiff vs diffusers
    [bench_controlnet_step]="$PY -m benchmarks.bench_controlnet_step --reps 10 --torch_threads 1"
  )
  default=(bench_samplers bench_unet bench_train bench_vs_torch bench_cpu_options profile_step
           profile_step_xla_defaults bench_compile_cache bench_finetune)
fi
names=("$@")
[ ${#names[@]} -eq 0 ] && names=("${default[@]}")
mkdir -p "benchmarks/results/$PROFILE"
status=0
for name in "${names[@]}"; do
  out="benchmarks/results/$PROFILE/$name.md"
  echo "== $name: ${CMD[$name]}"
  { echo "\$ ${CMD[$name]}"; echo "($(date -u +%Y-%m-%d), git ${GIT_REV:-$(git rev-parse --short HEAD 2>/dev/null || echo '?')})"; echo;
    ${CMD[$name]} 2>"benchmarks/results/$PROFILE/$name.stderr"; } | tee "$out"
  rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then
    echo "!! $name failed (exit $rc); stderr tail:"; tail -n 15 "benchmarks/results/$PROFILE/$name.stderr"
    status=1
  else
    rm -f "benchmarks/results/$PROFILE/$name.stderr"
  fi
done
exit $status
