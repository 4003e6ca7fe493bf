"""SDXL's two text encoders at full size: jaxdiff's ``CLIPTextModel`` against transformers' on the
same random weights, one forward pass each, their difference and their time on this machine.
Measures, never asserts.

    python -m benchmarks.bench_sdxl_text                 # both encoders, float32, batch 2
    python -m benchmarks.bench_sdxl_text --dtype bfloat16

- **Models**: stabilityai/stable-diffusion-xl-base-1.0's ``text_encoder/config.json`` (CLIP
  ViT-L/14's text tower, a ``CLIPTextModel``: 12 layers of width 768, quick-GELU, 123M
  parameters) and ``text_encoder_2/config.json`` (OpenCLIP ViT-bigG/14's, a
  ``CLIPTextModelWithProjection``: 32 layers of width 1280, GELU, a 1280-wide projection, 695M
  parameters), with transformers' own random init (``torch.manual_seed(0)``), converted by
  :func:`jaxdiff.convert.clip_text_from_transformers`.
- **Inputs**: ``--batch`` rows of 77 token ids as SDXL's tokenizers make them: BOS 49406, a
  prompt of random word ids of each row's length, EOS 49407, then padding (49407 for the first
  tokenizer, 0 = ``"!"`` for the second). Both configs keep ``eos_token_id = 2``, so both sides
  pool at the first 49407 (transformers' legacy ``argmax`` rule).
- **Compared**: what SDXL's pipeline reads: each encoder's penultimate hidden state
  (``hidden_states[-2]``, ``[B, 77, D]``) and encoder 2's pooled ``text_embeds`` (``[B, 1280]``);
  max |jaxdiff - transformers| and that over max |transformers|.
- **Timing**: jaxdiff's first call (compile + run) separately, then ``--reps`` calls of each side,
  alternating, after one warm-up each; medians. torch runs eagerly under ``torch.no_grad`` with
  its default threads.
"""

from __future__ import annotations

import argparse
import gc
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import alternate, machine, rss_bytes

_COMMON = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=0, eos_token_id=2,
               pad_token_id=1, layer_norm_eps=1e-5, attention_dropout=0.0, dropout=0.0,
               initializer_factor=1.0, initializer_range=0.02)
# The two text_encoder*/config.json of stabilityai/stable-diffusion-xl-base-1.0.
TEXT_ENCODER = dict(_COMMON, hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                    num_hidden_layers=12, hidden_act="quick_gelu", projection_dim=768)
TEXT_ENCODER_2 = dict(_COMMON, hidden_size=1280, intermediate_size=5120, num_attention_heads=20,
                      num_hidden_layers=32, hidden_act="gelu", projection_dim=1280)
BOS, EOS = 49406, 49407


def token_ids(batch: int, pad_id: int, seed: int = 0) -> np.ndarray:
    """``[batch, 77]`` int32: BOS, a prompt of random word ids (lengths 5, 20, 35, ...), EOS,
    padding ``pad_id``."""
    rng = np.random.default_rng(seed)
    ids = np.full((batch, 77), pad_id, np.int32)
    for i in range(batch):
        n = min(5 + 15 * i, 75)
        ids[i, 0] = BOS
        ids[i, 1:n + 1] = rng.integers(300, 49000, n)
        ids[i, n + 1] = EOS
    return ids


def compare(name: str, config: dict, with_projection: bool, pad_id: int, args) -> list[str]:
    """One encoder: build in torch, convert, run both, time both; returns the report lines."""
    import torch
    import transformers

    from jaxdiff.compile_options import cpu_compiler_options
    from jaxdiff.convert import clip_text_from_transformers
    from jaxdiff.models import CLIPTextModel

    torch_dtype = getattr(torch, args.dtype)
    jax_dtype = jnp.dtype(args.dtype)
    rss0 = rss_bytes()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    cls = (transformers.CLIPTextModelWithProjection if with_projection
           else transformers.CLIPTextModel)
    model = cls(transformers.CLIPTextConfig(**config)).eval().to(torch_dtype)
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    t0 = time.perf_counter()
    if args.dtype == "bfloat16":  # numpy has no bfloat16: convert a float32 copy, then cast
        cfg, params = clip_text_from_transformers(model.float(), dtype=jax_dtype,
                                                  param_dtype=jax_dtype)
        model = model.to(torch_dtype)
        params = jax.tree.map(lambda a: a.astype(jax_dtype), params)
    else:
        cfg, params = clip_text_from_transformers(model)
    convert_s = time.perf_counter() - t0
    gc.collect()

    ids = token_ids(args.batch, pad_id)
    tids = torch.from_numpy(ids.astype(np.int64))

    def run_torch():
        with torch.no_grad():
            return model(tids, output_hidden_states=True)

    net = CLIPTextModel(cfg)
    apply = jax.jit(lambda p, x: net.apply({"params": p}, x),
                    compiler_options=cpu_compiler_options())
    jids = jnp.asarray(ids)

    def run_jax():
        return apply(params, jids)

    t0 = time.perf_counter()
    out = jax.block_until_ready(run_jax())
    compile_s = time.perf_counter() - t0
    ref = run_torch()
    pairs = [("hidden_states[-2]", out.hidden_states[-2], ref.hidden_states[-2])]
    if with_projection:
        pairs.append(("text_embeds", out.text_embeds, ref.text_embeds))
    rss_gb = (rss_bytes() - rss0) / 2**30
    times = alternate({"transformers": run_torch, "jaxdiff": run_jax}, reps=args.reps, warmup=1)
    lines = [f"{name}: {cls.__name__}, {n_params / 1e6:.1f}M params, {config['num_hidden_layers']} "
             f"layers of width {config['hidden_size']}, {args.dtype}; batch {args.batch} x 77 "
             f"tokens; median of {args.reps} after 1 warm-up",
             "| side | median s | vs transformers |", "|---|---:|---:|"]
    for side in ("transformers", "jaxdiff"):
        lines.append(f"| {side} | {times[side]:.3f} | "
                     f"{times['transformers'] / times[side]:.2f}x |")
    lines.append(f"transformers build {build_s:.1f} s; conversion {convert_s:.1f} s; jaxdiff first "
                 f"call (compile + run) {compile_s:.1f} s; resident memory growth {rss_gb:.1f} GiB")
    for what, got, want in pairs:
        want = want.float().numpy()
        got = np.asarray(jnp.asarray(got, jnp.float32))
        diff = float(np.abs(got - want).max())
        lines.append(f"{what} {list(want.shape)}: max |jaxdiff - transformers| {diff:.3g}; "
                     f"relative to max |transformers| {diff / float(np.abs(want).max()):.3g}")
    return lines   # the models go with this frame (main collects before the next encoder)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--encoders", default="1,2", help="which: 1 (CLIP-L), 2 (bigG) or 1,2")
    args = p.parse_args(argv)
    import torch

    print(f"machine: {machine()}; torch threads {torch.get_num_threads()}")
    which = {int(w) for w in args.encoders.split(",")}
    if 1 in which:
        print("\n".join(compare("text_encoder", TEXT_ENCODER, False, EOS, args)))
        gc.collect()
    if 2 in which:
        print("\n".join(compare("text_encoder_2", TEXT_ENCODER_2, True, 0, args)))


if __name__ == "__main__":
    main()
