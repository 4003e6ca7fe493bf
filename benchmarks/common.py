"""Shared pieces of the benchmarks: the machine line, timing that waits for both frameworks, and
the diffusers twin of a jaxdiff UNet config (same architecture, weights converted from it).

Timing is honest on an accelerator: ``timed`` waits for JAX's asynchronous dispatch
(``block_until_ready``) and for CUDA's queue (``torch.cuda.synchronize``) before it stops the clock.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import threading
import time

import jax

__all__ = ["cpu_name", "machine", "sync", "timed", "alternate", "rss_bytes", "peak_rss_growth",
           "xla_bytes", "diffusers_twin", "torch_forward"]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """One line: the accelerator JAX runs on (if any), the CPU, the core count, the load."""
    dev = jax.devices()[0]
    acc = "" if dev.platform == "cpu" else f"{jax.device_count()}x {dev.device_kind}, "
    from jaxdiff.compile_options import cpu_compiler_options

    opts = cpu_compiler_options()
    xla = (", XLA:CPU options " + ", ".join(f"{k}={v}" for k, v in opts.items()) if opts
           else ", XLA defaults" if dev.platform == "cpu" else "")
    return (f"{acc}{cpu_name()}, {os.cpu_count()} CPU cores, {platform.system()}; jax backend "
            f"{jax.default_backend()}{xla}; load average {os.getloadavg()[0]:.1f}")


def sync(out=None):
    """Wait until ``out`` (a JAX pytree) and everything queued on the GPU by torch is done."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return jax.block_until_ready(out)


def timed(fn) -> float:
    """Wall seconds of ``fn()``, including the device work it queued."""
    start = time.perf_counter()
    sync(fn())
    return time.perf_counter() - start


def alternate(fns: dict, reps: int, warmup: int) -> dict:
    """Median seconds of each ``fns[name]()``, the sides alternating so that load drifts hit all."""
    for _ in range(warmup):
        for f in fns.values():
            timed(f)
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            times[k].append(timed(f))
    return {k: statistics.median(v) for k, v in times.items()}


def rss_bytes() -> int:
    """This process's resident-set size, in bytes (Linux: /proc/self/statm)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_growth(fn) -> int:
    """Peak resident-set growth over ``fn()`` (sampled every 2 ms), in bytes."""
    base = rss_bytes()
    peak = [base]
    done = threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.002)

    th = threading.Thread(target=watch, daemon=True)
    th.start()
    sync(fn())
    done.set()
    th.join()
    return max(peak[0], rss_bytes()) - base


def xla_bytes(compiled) -> float:
    """XLA's own figure for a compiled computation: temporaries plus outputs, in bytes."""
    mem = compiled.memory_analysis()
    if mem is None:
        return float("nan")
    return float(getattr(mem, "temp_size_in_bytes", 0) + getattr(mem, "output_size_in_bytes", 0))


def diffusers_twin(cfg, seed: int = 0, sample_size: int = 28):
    """A diffusers ``UNet2DConditionModel`` with ``cfg``'s architecture, an ``nn.Embedding`` of
    class tokens where ``cfg`` feeds classes to cross-attention, and the jaxdiff params converted
    from their (random) weights: ``(model, emb or None, params)``, on the CPU."""
    import torch
    from diffusers import UNet2DConditionModel

    from jaxdiff.convert import convert_unet_state_dict

    down = {None: "DownBlock2D", "cross": "CrossAttnDownBlock2D"}
    up = {None: "UpBlock2D", "cross": "CrossAttnUpBlock2D"}
    mid = {None: "UNetMidBlock2D", "cross": "UNetMidBlock2DCrossAttn"}
    for kind in (*cfg.attention, *cfg.up_kinds, cfg.mid_attention):
        if kind not in down:
            raise ValueError(f"no UNet2DConditionModel twin for attention kind {kind!r}")
    tokens = cfg.num_classes is not None and cfg.class_conditioning == "cross_attention"
    torch.manual_seed(seed)
    model = UNet2DConditionModel(
        sample_size=sample_size, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        block_out_channels=cfg.block_channels, layers_per_block=cfg.layers_per_block,
        down_block_types=tuple(down[k] for k in cfg.attention),
        up_block_types=tuple(up[k] for k in cfg.up_kinds[::-1]),
        mid_block_type=mid[cfg.mid_attention] if cfg.mid_block else None,
        attention_head_dim=cfg.num_heads or 1, cross_attention_dim=cfg.context_dim or 8,
        norm_num_groups=cfg.norm_groups, norm_eps=cfg.norm_eps,
        flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift,
        num_class_embeds=(cfg.num_classes + 1 if cfg.num_classes is not None and not tokens
                          else None),
    )  # fmt: skip
    state = dict(model.state_dict())
    emb = None
    if tokens:
        emb = torch.nn.Embedding(cfg.num_classes + 1, cfg.num_class_tokens * cfg.context_dim)
        state["class_tokens.embedding.weight"] = emb.weight.detach()
    return model, emb, convert_unet_state_dict(state, cfg)


def torch_forward(model, emb, cfg, autocast_dtype=None):
    """``forward(x NCHW, t, labels) -> eps NCHW`` of the twin (labels through the class tokens or
    the class embedding), optionally under ``torch.autocast`` to ``autocast_dtype``."""
    import contextlib

    import torch

    def ctx_manager(x):
        if autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(x.device.type, dtype=autocast_dtype)

    def forward(x, t, labels):
        with ctx_manager(x):
            if emb is not None:
                ctx = emb(labels).view(labels.shape[0], cfg.num_class_tokens, cfg.context_dim)
                out = model(x, t, encoder_hidden_states=ctx).sample
            else:
                ctx = torch.zeros(labels.shape[0], 1, model.config.cross_attention_dim,
                                  device=x.device)
                out = model(x, t, encoder_hidden_states=ctx, class_labels=labels).sample
        return out.float()

    return forward
