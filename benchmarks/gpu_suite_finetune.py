"""GPU suite, part 5: one fine-tuning step of the SD 1.5-architecture model (jaxdiff's, as
``jaxdiff.training.fit`` runs it), 512x512, batch 4, bf16 compute: full and LoRA, each with and
without remat (gradient checkpointing of the UNet's blocks).

    python -m benchmarks.gpu_suite_finetune --rows rows.jsonl --workdir /tmp/suite [--smoke] \\
        [--ft_rows full,lora,full_remat,lora_remat]

The step is ``benchmarks.bench_finetune.jaxdiff_side``'s (the frozen VAE encodes and the frozen
text encoder embeds inside the step; AdamW, clipping, EMA; LoRA rank 4 on the UNet's attention
projections), with ``FinetuneConfig(compute_dtype="bfloat16")``: float32 master weights and
optimizer. The model is part 1's folder (``WORKDIR/sd_folder``, written if missing); inputs are
random images in ``[-1, 1]`` and random token ids (77). ``--smoke``: the tiny folder at 32x32,
float32 compute, batch 2.

Reported per row: images/s (batch over the median step of ``--reps`` after one warm-up), the
step's compile seconds, and memory: the device's peak bytes in use over the process
(``jax.Device.memory_stats()["peak_bytes_in_use"]``: weights, optimizer state, EMA, frozen models
and the step's temporaries; only where the backend keeps the statistic, as the GPU does: the
suite runs each row in its own process there, so that the peak is the row's), and XLA's own
figure for the compiled step (``memory_analysis()``: temporaries).
"""

from __future__ import annotations

import os

import numpy as np

from benchmarks.gpu_suite_env import Recorder, fmt, part_parser

ROWS = ("full", "lora", "full_remat", "lora_remat")


def main(argv=None):
    p = part_parser(__doc__.splitlines()[0])
    p.add_argument("--ft_rows", default=",".join(ROWS), help=f"comma-separated, of {ROWS}")
    p.add_argument("--reps", type=int, default=None, help="timed steps (default 5; smoke 2)")
    p.add_argument("--header", action="store_true", help="print the table's header first")
    args = p.parse_args(argv)
    rows = [r for r in args.ft_rows.split(",") if r]
    bad = [r for r in rows if r not in ROWS]
    if bad:
        p.error(f"--ft_rows: unknown {bad}; choose from {ROWS}")
    reps = args.reps or (2 if args.smoke else 5)

    import jax

    from benchmarks.bench_finetune import jaxdiff_side
    from benchmarks.common import machine
    from benchmarks.gpu_suite_env import median_time
    from benchmarks.gpu_suite_sd import sd_folder, settings
    from jaxdiff.pipelines import load_stable_diffusion

    rec = Recorder(args.rows, "finetune")
    folder, _ = sd_folder(args.workdir, args.smoke)
    sd = load_stable_diffusion(folder)
    batch, size = (2, settings(True)["size"]) if args.smoke else (4, 512)
    dtype = "float32" if args.smoke else "bfloat16"
    length = sd.text_config.max_position_embeddings
    rng = np.random.default_rng(0)
    examples = {"pixel_values": rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32),
                "input_ids": rng.integers(0, sd.text_config.vocab_size,
                                          (batch, length)).astype(np.int32)}
    if args.header:
        print(f"machine: {machine()}\nmodel: SD 1.5 architecture"
              f"{' (smoke: tiny)' if args.smoke else ''}, {size}x{size}, batch {batch}, "
              f"{dtype} compute, LoRA rank 4; median of {reps} steps after one warm-up\n")
        print("| row | trainable params | step ms | images/s | compile s | device peak GiB | "
              "XLA temp GiB |\n|---|---:|---:|---:|---:|---:|---:|", flush=True)
    dev = jax.devices()[0]
    for row in rows:
        run, info = jaxdiff_side(sd, examples, row, batch, 4, compute_dtype=dtype)
        _, med, _ = median_time(run, reps)
        stats = dev.memory_stats() or {}
        peak = stats.get("peak_bytes_in_use")
        gib = (lambda b: None if b is None or b != b else b / 2**30)  # noqa: E731
        rec.row(row=row, batch=batch, size=size, dtype=dtype, trainable=info["trainable"],
                step_s=med, images_per_s=batch / med, compile_s=info["compile_s"],
                device_peak_bytes=peak, xla_temp_bytes=info["temp"],
                peak_note=None if peak is not None else f"{dev.platform}: no memory_stats")
        print(f"| {row} | {info['trainable']:,} | {med * 1e3:.1f} | {batch / med:.2f} | "
              f"{info['compile_s']:.1f} | {fmt(gib(peak), '.2f')} | "
              f"{fmt(gib(info['temp']), '.2f')} |", flush=True)
        del run


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
