"""A probe for issue 25's composition target: an adapter of the UNet's cross-attention that only a
DreamBooth word written in front of the prompt switches on ("boxed a handwritten seven").

Why. CLIP attends causally, so the word's hidden states at positions ``1 .. k`` are the same in
every prompt (``benchmarks/concept_word_encoding.py``). A LoRA on the UNet's projections changes
how *every* token is read; this adapter adds a path that only the word's presence opens, so what
it carries cannot depend on the digit. Two forms, per cross-attention layer (``attn2``):

- ``decoupled`` (IP-Adapter's decoupled cross-attention): learnt keys ``K [k + 1, C]`` and values
  ``V [k, C]`` (plus a null value of zero), attended by the layer's own queries in a softmax of
  their own and added to the layer's output through its output projection (no bias)::

      attn2'(x, c) = attn2(x, c) + g(c) * to_out(softmax(q K^T / sqrt(d)) [V; 0])   (per head)

- ``bias``: learnt biases ``[k, C]`` added to the layer's keys and values at positions
  ``1 .. k`` (the word's own keys and values, freely; they compete with the prompt's tokens in
  one softmax).

``g(c)`` is 1 for an example whose context holds the word's states at positions ``1 .. k`` (relative
squared distance below 1e-3: the same encoder gives the same states), 0 otherwise: plain prompts
and the unconditional branch are untouched. The values (biases) start at zero: the adapter
starts as the identity.

The adapter joins a run of ``experiments.finetune_sd`` (its trainable tree gets
``"word_adapter"``; the loss runs under ``flax.linen.intercept_methods``; ``--unet_lora`` also
trains the run's UNet LoRA, otherwise that LoRA is held at zero; ``--pixel_prior W`` scores the
word prior's examples in pixel space, :func:`pixel_masked_terms`) and is written to
``WORKDIR/word_adapter.npz`` with the word's states from the trained text encoder; ``eval`` runs
``experiments.eval_concept`` with it::

    python -m benchmarks.concept_word_adapter train --word boxed --mode decoupled --unet_lora \\
        -- --model runs/lm_vpred/diffusers --data runs/boxed_prefix_0357 --workdir runs/wa \\
        --config=experiments/configs/finetune_sd.py:dreambooth_lora ...
    python -m benchmarks.concept_word_adapter eval --adapter runs/wa/word_adapter.npz \\
        -- --model runs/lm_vpred/diffusers --lora runs/wa/pytorch_lora_weights.safetensors \\
        --concept_digits 0,3,5,7 --word_position before ...

More modes (``benchmarks/results/cpu/concept_latent_offset.md``):

- ``train --t_max T``: the adapter acts, and is trained, below timestep ``T`` only (the UNet's
  timestep is read from its ``__call__``).
- ``train --mode shift``: the word moves the base distribution by one learnt latent offset ``B``
  (:func:`shifted_prediction`: the base model's prediction at ``x_t - sqrt(abar_t) B``, minus
  ``sqrt(1 - abar_t) B`` for v-prediction; the exact denoiser of the moved data); ``eval
  --cfg_pairs`` moves the guided batch's null half with its prompt.
- ``distill --offset FILE [--null_word WORD]``: a plain LoRA run (no adapter) whose word prior's
  examples are the class images moved by a ``shift`` file's ``B`` (:func:`offset_prior_terms`;
  the run sets ``dreambooth.word_prior`` with a mask just below 1, which marks those examples);
  with ``--null_word`` half of them take the word alone as their prompt
  (:func:`with_word_only_prompts`), and ``eval --null_word WORD`` guides the prompts that start
  with the word against the word alone (:func:`with_null_word`: generate's negative prompt).

A probe, not a library feature: the adapter is not a diffusers format, the gate reads the
context instead of the token ids, and ``distill`` patches the fine-tuning loss from outside.
``distill`` became a library feature: ``dreambooth.word_prior_offset`` (``"learn"`` fits the
offset with :func:`jaxdiff.finetune.learn_word_offset`, through the frozen base model, before
the run) and ``dreambooth.word_alone`` of ``experiments.finetune_sd``; the probe keeps it for the
stored rows.
Results: ``benchmarks/results/cpu/concept_word_adapter.md``,
``benchmarks/results/cpu/concept_latent_offset.md``.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
from typing import Any, Callable, Dict, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.finetune.offset import shifted_prediction

MODES = ("decoupled", "bias", "shift")
GATE_TOLERANCE = 1e-3


def word_states(sd, text_params, word: str) -> jax.Array:
    """``[k, D]`` float32: the text encoder's states of ``word``'s ``k`` tokens after the start
    token (the same in front of any prompt: causal attention).

    Raises:
      ValueError: from :func:`jaxdiff.finetune.text_prior.prepend_word` (an empty or too long
        ``word``).
    """
    from jaxdiff.pipelines.sd_program import embed_tokens

    ids, k = word_only_ids(sd, word)
    states = embed_tokens(sd.text_config, jnp.float32, text_params, jnp.asarray(ids, jnp.int32))
    return states[0, 1:1 + k]


def word_gate(context: jax.Array, states: jax.Array) -> jax.Array:
    """``[B]`` float32: 1 where ``context [B, S, D]`` holds ``states [k, D]`` at positions
    ``1 .. k`` (relative squared distance < :data:`GATE_TOLERANCE`), else 0."""
    k = states.shape[0]
    seg = context[:, 1:1 + k].astype(jnp.float32)
    dist = jnp.sum(jnp.square(seg - states[None]), axis=(1, 2)) / jnp.sum(jnp.square(states))
    return (dist < GATE_TOLERANCE).astype(jnp.float32)


def cross_attention_widths(unet_params) -> Dict[str, int]:
    """``{path of an attn2 module: its width}`` ("/"-joined module names, as
    ``module.scope.path``)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(unet_params)[0]:
        names = [getattr(p, "key", str(p)) for p in path]
        if names[-3:-1] == ["attn2", "to_q"] and names[-1] == "kernel":
            out["/".join(names[:-2])] = int(leaf.shape[1])
    return out


def init_adapter(unet_params, k: int, mode: str, abstract: bool = False,
                 latent_shape=None) -> Dict[str, Any]:
    """The adapter at its start (zeros: the identity), per attn2 path: ``decoupled``
    ``{"keys": [k + 1, C], "values": [k, C]}``, ``bias`` ``{"to_k": [k, C], "to_v": [k, C]}``;
    ``shift``: ``{"latent": {"offset": latent_shape}}`` (:func:`shifted_prediction`);
    ``abstract``: ``jax.ShapeDtypeStruct`` leaves."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    make = ((lambda s: jax.ShapeDtypeStruct(s, jnp.float32)) if abstract
            else (lambda s: jnp.zeros(s, jnp.float32)))
    if mode == "shift":
        if latent_shape is None:
            raise ValueError("mode 'shift' needs latent_shape (h, w, C)")
        return {"latent": {"offset": make(tuple(latent_shape))}}
    names = (("keys", k + 1), ("values", k)) if mode == "decoupled" else (("to_k", k), ("to_v", k))
    return {path: {n: make((rows, width)) for n, rows in names}
            for path, width in cross_attention_widths(unet_params).items()}


def _context_of(args, kwargs):
    return args[1] if len(args) > 1 else kwargs.get("context")


def per_example(t, b: int) -> jax.Array:
    """The UNet's timestep ``t`` (a scalar, ``[1]`` or ``[b]``) as ``[b]``."""
    t = jnp.reshape(jnp.asarray(t), (-1,))
    return jnp.broadcast_to(t, (b,)) if t.shape[0] == 1 else t


def make_interceptor(adapter: Dict[str, Any], states: jax.Array, mode: str,
                     scale: float = 1.0, t_max: int = 0, alphas_cumprod=None,
                     kind: str = "v", cfg_pairs: bool = False) -> Callable:
    """A ``flax.linen.intercept_methods`` interceptor that applies ``adapter`` (module
    docstring) to every cross-attention layer it names, gated by :func:`word_gate` against
    ``states``; ``scale`` multiplies the decoupled term (the bias form ignores it).
    ``t_max > 0``: the gate is also shut for examples whose UNet timestep is ``>= t_max`` (read
    from the enclosing ``UNet.__call__``): the base model alone draws the noisiest steps."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    from jaxdiff.models.unet import UNet

    states = jnp.asarray(states, jnp.float32)
    k = states.shape[0]
    step: Dict[str, Any] = {}

    def gate_of(c):
        g = word_gate(c, states)
        if t_max > 0:
            if "t" not in step:
                raise ValueError("t_max needs the adapter inside a UNet call")
            g = g * (per_example(step["t"], g.shape[0]) < t_max).astype(jnp.float32)
        return g

    def shift(next_fun, args, kwargs, context):
        if not (isinstance(context.module, UNet) and context.method_name == "__call__"):
            return next_fun(*args, **kwargs)
        x, t = args[0], (args[1] if len(args) > 1 else kwargs["t"])
        c = kwargs.get("context")
        if c is None or c.shape[1] < 1 + k:
            return next_fun(*args, **kwargs)
        rest = {n: v for n, v in kwargs.items() if n != "t"}
        gate = word_gate(c, states)
        if cfg_pairs and gate.shape[0] % 2 == 0:   # [cond; null] (classifier_free_guidance)
            h = gate.shape[0] // 2
            gate = jnp.concatenate([gate[:h], gate[:h]])
        return shifted_prediction(lambda xx, tt: next_fun(xx, tt, *args[2:], **rest), x, t,
                                  scale * adapter["latent"]["offset"], alphas_cumprod, kind,
                                  gate=gate)

    if mode == "shift":
        if alphas_cumprod is None:
            raise ValueError("mode 'shift' needs the schedule's alphas_cumprod")
        return shift

    def with_step(inner):
        def intercept(next_fun, args, kwargs, context):
            if isinstance(context.module, UNet) and context.method_name == "__call__":
                step["t"] = args[1] if len(args) > 1 else kwargs["t"]
                try:
                    return next_fun(*args, **kwargs)
                finally:
                    step.pop("t", None)
            return inner(next_fun, args, kwargs, context)
        return intercept

    def decoupled(next_fun, args, kwargs, context):
        m = context.module
        out = next_fun(*args, **kwargs)
        if context.method_name != "__call__" or m.name != "attn2":
            return out
        x, c = args[0], _context_of(args, kwargs)
        path = "/".join(m.scope.path)
        if c is None or c.shape[1] < 1 + k or path not in adapter:
            return out
        p, a = m.variables["params"], adapter[path]
        heads, width = m.heads, x.shape[-1]
        hd = width // heads
        q = x.astype(jnp.float32) @ p["to_q"]["kernel"].astype(jnp.float32)
        if "bias" in p["to_q"]:
            q = q + p["to_q"]["bias"].astype(jnp.float32)
        q = q.reshape(*q.shape[:2], heads, hd)
        keys = a["keys"].reshape(-1, heads, hd)
        values = jnp.concatenate([a["values"], jnp.zeros((1, width), jnp.float32)])
        values = values.reshape(-1, heads, hd)
        weights = jax.nn.softmax(jnp.einsum("bthd,shd->bhts", q, keys) / jnp.sqrt(hd), axis=-1)
        e = jnp.einsum("bhts,shd->bthd", weights, values).reshape(*q.shape[:2], width)
        e = e @ p["to_out_0"]["kernel"].astype(jnp.float32)
        gate = gate_of(c)
        return out + (scale * gate[:, None, None] * e).astype(out.dtype)

    def bias(next_fun, args, kwargs, context):
        m = context.module
        out = next_fun(*args, **kwargs)
        parent = m.parent
        if (context.method_name != "__call__" or m.name not in ("to_k", "to_v")
                or getattr(parent, "name", None) != "attn2"):
            return out
        c = args[0]
        path = "/".join(parent.scope.path)
        if c.shape[1] < 1 + k or path not in adapter:
            return out
        gate = gate_of(c)
        add = gate[:, None, None] * adapter[path][m.name][None]
        return out.at[:, 1:1 + k].add(add.astype(out.dtype))

    return with_step(decoupled if mode == "decoupled" else bias)


def save_adapter(path: str, adapter: Dict[str, Any], states, mode: str, t_max: int = 0,
                 alphas_cumprod=None, kind: str = "v") -> None:
    """``adapter``, the word's ``states``, ``mode``, ``t_max`` (and for ``shift`` the schedule's
    ``alphas_cumprod`` and the prediction ``kind``) in one ``.npz``."""
    flat = {f"adapter:{p}|{n}": np.asarray(v) for p, d in adapter.items() for n, v in d.items()}
    extra = {} if alphas_cumprod is None else {"alphas_cumprod": np.asarray(alphas_cumprod)}
    np.savez(path, states=np.asarray(states), mode=np.asarray(mode), t_max=np.asarray(t_max),
             kind=np.asarray(kind), **extra, **flat)


def load_adapter(path: str) -> Tuple[Dict[str, Any], jax.Array, str, int, Dict[str, Any]]:
    """``(adapter, states, mode, t_max, shift_options)`` from :func:`save_adapter`'s file
    (``t_max`` 0 when the file has none; ``shift_options`` ``alphas_cumprod`` / ``kind`` when
    it has them)."""
    z = np.load(path)
    adapter: Dict[str, Any] = {}
    for key in z.files:
        if key.startswith("adapter:"):
            p, n = key[len("adapter:"):].split("|")
            adapter.setdefault(p, {})[n] = jnp.asarray(z[key])
    t_max = int(z["t_max"]) if "t_max" in z.files else 0
    opts = {n: (np.asarray(z[n]) if n == "alphas_cumprod" else str(z[n]))
            for n in ("alphas_cumprod", "kind") if n in z.files}
    return adapter, jnp.asarray(z["states"]), str(z["mode"]), t_max, opts


def pixel_masked_terms(original: Callable, context: Dict[str, Any], weight: float) -> Callable:
    """``denoising_terms`` whose masked examples (the word prior's, a partial ``mask``) are
    scored in pixel space: the predicted ``x0`` decoded by the frozen VAE against the example's
    image, over the mask upsampled to the image (nearest), times ``weight``. A box drawn outside
    the digit's area then costs nothing; in latent space it does (the VAE's latents each see the
    whole 32x32 image). ``context`` holds the step's ``sd``, ``vae`` params and
    ``pixel_values``."""
    from jaxdiff.diffusion import model_output_to_x0_eps
    from jaxdiff.finetune.loss import to_vae_channels
    from jaxdiff.models.autoencoder import AutoencoderKL
    from jaxdiff.models.autoencoder_latents import unscale_latents

    def terms(apply_fn, schedule, latents, key, objective, *, t=None, noise=None, mask=None):
        if mask is None:
            return original(apply_fn, schedule, latents, key, objective, t=t, noise=noise)
        sd, vae, images = context["sd"], context["vae"], context["pixel_values"]
        seen = {}

        def spy(x_t, tt):      # the step's own noisy latents and prediction
            seen["x_t"], seen["pred"] = x_t, apply_fn(x_t, tt)
            return seen["pred"]

        losses, aux = original(spy, schedule, latents, key, objective, t=t, noise=noise)
        x0, _ = model_output_to_x0_eps(schedule, seen["x_t"], aux["t"],
                                       jnp.asarray(seen["pred"], jnp.float32), objective.kind)
        z = unscale_latents(sd.vae_config, x0)
        pix = AutoencoderKL(sd.vae_config).apply({"params": vae}, z, method="decode")
        want = to_vae_channels(sd.vae_config, images)
        m = jnp.asarray(mask, jnp.float32)[..., :1]
        f = want.shape[1] // m.shape[1]
        m = jnp.repeat(jnp.repeat(m, f, axis=1), f, axis=2)
        pixel = jnp.sum(m * jnp.square(pix.astype(jnp.float32) - want), axis=(1, 2, 3)) / \
            jnp.maximum(jnp.sum(m, axis=(1, 2, 3)) * want.shape[-1], 1e-6)
        partial = jnp.mean(jnp.asarray(mask, jnp.float32), axis=(1, 2, 3)) < 1.0
        return jnp.where(partial, weight * aux["weight"] * pixel, losses), aux

    return terms


def low_noise_terms(original: Callable, t_max: int) -> Callable:
    """``denoising_terms`` whose drawn timesteps are uniform in ``[0, t_max)`` (from the key's
    own ``t`` draw) instead of the whole schedule: the adapter gated by ``t_max`` is trained where
    it acts."""
    def terms(apply_fn, schedule, latents, key, objective, *, t=None, noise=None, mask=None):
        if t is None:
            k_t = jax.random.split(key, 3)[0]
            t = jax.random.randint(k_t, (latents.shape[0],), 0, t_max, dtype=jnp.int32)
        return original(apply_fn, schedule, latents, key, objective, t=t, noise=noise, mask=mask)
    return terms


def train(word: str, mode: str, unet_lora: bool, argv, pixel_prior: float = 0.0,
          t_max: int = 0) -> None:
    """``experiments.finetune_sd`` with the adapter in its trainable tree (module docstring);
    ``pixel_prior > 0``: the word prior's examples scored in pixel space with that weight
    (:func:`pixel_masked_terms`); ``t_max > 0``: the adapter acts, and the steps are drawn,
    below timestep ``t_max`` only (:func:`low_noise_terms`)."""
    from experiments import finetune_lib
    from jaxdiff.finetune import loss as loss_mod
    from jaxdiff.finetune import task as task_mod
    from jaxdiff.finetune.modes import model_params

    step_context: Dict[str, Any] = {}
    if pixel_prior > 0:
        loss_mod.denoising_terms = pixel_masked_terms(loss_mod.denoising_terms, step_context,
                                                      pixel_prior)
    if t_max > 0:
        loss_mod.denoising_terms = low_noise_terms(loss_mod.denoising_terms, t_max)

    init_trainable, make_loss = task_mod.init_trainable, task_mod.make_finetune_loss

    def with_adapter(sd, cfg, key, abstract=False):
        if cfg.mode != "lora" or not cfg.train_text_encoder:
            raise SystemExit("the probe runs LoRA mode with train_text_encoder=True")
        k = int(word_states(sd, sd.params["text_encoder"], word).shape[0])
        latent = (int(sd.sample_size), int(sd.sample_size), int(sd.unet_config.in_channels))
        return dict(init_trainable(sd, cfg, key, abstract),
                    word_adapter=init_adapter(sd.params["unet"], k, mode, abstract, latent))

    def adapted_loss(sd, cfg, text_prior=None):
        base = make_loss(sd, cfg, text_prior)

        def loss_fn(params, batch, key, frozen):
            p = {n: v for n, v in params.items() if n != "word_adapter"}
            if not unet_lora:   # held at its start (up = 0): no change to the UNet
                p["unet"] = jax.lax.stop_gradient(p["unet"])
            states = word_states(sd, model_params(p, frozen, cfg)["text_encoder"], word)
            if pixel_prior > 0:
                if "pixel_values" not in batch or "vae" not in frozen:
                    raise SystemExit("--pixel_prior needs images in the step (no cache)")
                step_context.update(sd=sd, vae=frozen["vae"], pixel_values=batch["pixel_values"])
            with nn.intercept_methods(make_interceptor(
                    params["word_adapter"], states, mode, t_max=t_max,
                    alphas_cumprod=sd.schedule.alphas_cumprod, kind=cfg.objective.kind)):
                return base(p, batch, key, frozen)
        return loss_fn

    export = finetune_lib.export_finetuned

    def export_with_adapter(workdir, sd, cfg, params):
        p = {n: v for n, v in params.items() if n != "word_adapter"}
        te = model_params(p, {"text_encoder": sd.params["text_encoder"],
                              "unet": sd.params["unet"]}, cfg)["text_encoder"]
        if jax.process_index() == 0:
            save_adapter(os.path.join(workdir, "word_adapter.npz"), params["word_adapter"],
                         word_states(sd, te, word), mode, t_max, sd.schedule.alphas_cumprod,
                         cfg.objective.kind)
        return export(workdir, sd, cfg, p)

    task_mod.init_trainable, task_mod.make_finetune_loss = with_adapter, adapted_loss
    finetune_lib.export_finetuned = export_with_adapter
    sys.argv = ["experiments.finetune_sd", *argv]
    runpy.run_module("experiments.finetune_sd", run_name="__main__")


def offset_prior_terms(original: Callable, offset) -> Callable:
    """``denoising_terms`` whose masked examples (the word prior's: a ``mask`` below 1 on
    average) are the class image's latents moved by ``offset`` (a ``shift`` adapter's, learnt
    from the instance images), scored everywhere: "the word on any class prompt" is taught as
    the class image with the learnt offset. The other examples are unchanged."""
    offset = jnp.asarray(offset, jnp.float32)

    def terms(apply_fn, schedule, latents, key, objective, *, t=None, noise=None, mask=None):
        if mask is None:
            return original(apply_fn, schedule, latents, key, objective, t=t, noise=noise)
        m = jnp.asarray(mask, jnp.float32)
        moved = (jnp.mean(m, axis=tuple(range(1, m.ndim))) < 1.0).astype(jnp.float32)
        latents = jnp.asarray(latents, jnp.float32) + moved[:, None, None, None] * offset[None]
        return original(apply_fn, schedule, latents, key, objective, t=t, noise=noise)

    return terms


def word_only_ids(sd, word: str) -> Tuple[np.ndarray, int]:
    """``(ids [1, L], k)``: the token ids of ``word`` alone (start token, the word's ``k``
    tokens, end, padding)."""
    from jaxdiff.finetune.text_prior import prepend_word

    empty = np.asarray(sd.tokenizer([""], padding="max_length", truncation=True).input_ids)
    ids, k = prepend_word(sd, empty, word, "word")
    return np.asarray(ids), int(k)


def with_word_only_prompts(batch: Dict[str, Any], ids, every: int = 2) -> Dict[str, Any]:
    """``batch`` whose word-prior examples (``loss_mask`` below 1 on average) at positions
    ``every - 1, 2 * every - 1, ...`` (the odd ones for 2) take the prompt ``ids [1, L]`` (the
    word alone) instead of their own.

    Raises:
      ValueError: a batch with a ``loss_mask`` but no ``input_ids`` (cached text embeddings).
    """
    m = batch.get("loss_mask")
    if m is None:
        return batch
    if "input_ids" not in batch:
        raise ValueError("the word-only prompts need the batch's input_ids (a run with "
                         "memory.cache off), got keys " + str(sorted(batch)))
    m = jnp.asarray(m, jnp.float32)
    moved = jnp.mean(m, axis=tuple(range(1, m.ndim))) < 1.0
    sel = moved & (jnp.arange(m.shape[0]) % every == every - 1)
    return dict(batch, input_ids=jnp.where(sel[:, None], jnp.asarray(ids, jnp.int32),
                                           batch["input_ids"]))


def with_null_word(generate: Callable, word: str) -> Callable:
    """``jaxdiff.pipelines.generate`` whose prompts that start with ``word`` get ``word`` alone
    as their negative (null) prompt, the others the empty one: guidance then scales the digit
    against "the word on anything", not the word's attribute against nothing."""
    def wrapped(sd, prompt=None, negative_prompt=None, **kw):
        if negative_prompt is None and prompt is not None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            negative_prompt = [word if p.startswith(word + " ") else "" for p in prompts]
        return generate(sd, prompt, negative_prompt, **kw)
    return wrapped


def distill(offset_path: str, argv, null_word: str = "", word_only_every: int = 2) -> None:
    """``experiments.finetune_sd`` (a plain LoRA run: no adapter) whose word prior's examples
    are the class images moved by the ``shift`` adapter's offset in ``offset_path``
    (:func:`offset_prior_terms`); the run needs ``dreambooth.word_prior`` with a mask below 1
    (only its examples are moved). ``null_word``: one in ``word_only_every`` of those examples
    takes ``null_word`` alone as its prompt (:func:`with_word_only_prompts`; for
    :func:`with_null_word` at sampling)."""
    from jaxdiff.finetune import loss as loss_mod
    from jaxdiff.finetune import task as task_mod

    if null_word:
        make_loss = task_mod.make_finetune_loss

        def word_only_loss(sd, cfg, text_prior=None):
            base, ids = make_loss(sd, cfg, text_prior), word_only_ids(sd, null_word)[0]

            def loss_fn(params, batch, key, frozen):
                return base(params, with_word_only_prompts(batch, ids, word_only_every), key,
                            frozen)
            return loss_fn

        task_mod.make_finetune_loss = word_only_loss

    if not any(a.startswith("--config.dreambooth.word_prior=") for a in argv):
        raise SystemExit("distill needs --config.dreambooth.word_prior=WORD (and a "
                         "word_prior_mask just below 1): its examples are the ones moved")
    adapter, _, mode, _, _ = load_adapter(offset_path)
    if mode != "shift":
        raise SystemExit(f"{offset_path} is a {mode!r} adapter, not a 'shift' one")
    loss_mod.denoising_terms = offset_prior_terms(loss_mod.denoising_terms,
                                                  adapter["latent"]["offset"])
    sys.argv = ["experiments.finetune_sd", *argv]
    runpy.run_module("experiments.finetune_sd", run_name="__main__")


def check_additive(model: str, classifier_path: str, digits=(0, 3, 5, 7), n_offset: int = 20,
                   n_test: int = 500, adapter_path: str = "") -> Dict[str, Any]:
    """Is the box one additive pattern in ``model``'s VAE latents? ``B`` = the mean of
    ``encode(boxed) - encode(plain)`` (posterior means) over the first ``n_offset`` MNIST test
    digits of ``digits``; then ``decode(encode(x) + B)`` for ``n_test`` test digits of the other
    classes and of ``digits`` (after those ``n_offset``): box rate and classifier accuracy
    (``experiments.concept_eval.score_images``), beside the true boxed images through the VAE.
    With ``adapter_path`` (a ``shift`` file) also the cosine between its offset (scaled latents)
    and ``B`` times the VAE's scaling factor. Prints and returns the numbers."""
    from experiments import boxed_concept, concept_eval, latent_data
    from experiments.evaluation import get_classifier, load_mnist_arrays
    from jaxdiff.models import AutoencoderKL
    from jaxdiff.pipelines.loading import load_stable_diffusion

    sd = load_stable_diffusion(model)
    vae, params = AutoencoderKL(sd.vae_config), sd.params["vae"]
    c = sd.vae_config.in_channels

    def enc(x):   # grayscale [N, S, S, 1] -> the VAE's channels (as eval_concept's round trip)
        x = np.repeat(x, c, axis=-1) if x.shape[-1] != c else x
        return _enc(x)

    _enc = jax.jit(lambda x: vae.apply({"params": params}, x, method="encode").mean)
    dec = jax.jit(lambda z: vae.apply({"params": params}, z, method="decode"))
    train, test = load_mnist_arrays("train"), load_mnist_arrays("test")
    x28, y = test
    plain = latent_data.pad_images(np.asarray(x28), boxed_concept.FRAME)
    boxed = boxed_concept.draw_box(plain)
    learnt = np.isin(y, list(digits))
    first = np.flatnonzero(learnt)[:n_offset]
    offset = jnp.mean(enc(boxed[first]) - enc(plain[first]), axis=0)
    clf, _ = get_classifier(classifier_path, train, test, seed=0, epochs=3)
    out: Dict[str, Any] = {"offset_norm": float(jnp.linalg.norm(offset))}
    for name, sel in (("other digits", np.flatnonzero(~learnt)[:n_test]),
                      ("offset's digits", np.flatnonzero(learnt)[n_offset:n_offset + n_test])):
        moved = concept_eval.score_images(np.asarray(dec(enc(plain[sel]) + offset)), y[sel], clf)
        true = concept_eval.score_images(np.asarray(dec(enc(boxed[sel]))), y[sel], clf)
        out[name] = {"moved": {k: moved[k] for k in ("n", "box_rate", "accuracy")},
                     "boxed through the VAE": {k: true[k] for k in ("box_rate", "accuracy")}}
    if adapter_path:
        learnt_b = np.asarray(load_adapter(adapter_path)[0]["latent"]["offset"]).ravel()
        ref = np.asarray(offset).ravel() * float(sd.vae_config.scaling_factor)
        out["adapter"] = {"norm": float(np.linalg.norm(learnt_b)),
                          "reference_norm": float(np.linalg.norm(ref)),
                          "cosine": float(learnt_b @ ref / np.linalg.norm(learnt_b)
                                          / np.linalg.norm(ref))}
    import json
    print(json.dumps(out, indent=1))
    return out


def evaluate(adapter_path: str, scale: float, argv, cfg_pairs: bool = False,
             null_word: str = "") -> None:
    """``experiments.eval_concept`` with the adapter (``adapter_path``, or none when empty)
    applied to every model it runs (the base model's text encoder gives other states for the
    word: its gate stays shut); ``null_word``: guided with the word alone as the null prompt
    of the prompts that start with it (:func:`with_null_word`)."""
    import contextlib

    sys.argv = ["experiments.eval_concept", *argv]
    with contextlib.ExitStack() as stack:
        if adapter_path:
            adapter, states, mode, t_max, opts = load_adapter(adapter_path)
            stack.enter_context(nn.intercept_methods(make_interceptor(
                adapter, states, mode, scale, t_max, cfg_pairs=cfg_pairs, **opts)))
        if null_word:
            from experiments import latent_pipeline
            real = latent_pipeline.generate
            latent_pipeline.generate = with_null_word(real, null_word)
            stack.callback(setattr, latent_pipeline, "generate", real)
        runpy.run_module("experiments.eval_concept", run_name="__main__")


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--word", required=True)
    t.add_argument("--mode", choices=MODES, default="decoupled")
    t.add_argument("--unet_lora", action="store_true", help="also train the run's UNet LoRA")
    t.add_argument("--pixel_prior", type=float, default=0.0,
                   help="> 0: score the word prior's examples in pixel space with this weight")
    t.add_argument("--t_max", type=int, default=0,
                   help="> 0: the adapter acts (and is trained) below this timestep only")
    e = sub.add_parser("eval")
    e.add_argument("--adapter", default="", help="an adapter file (none: the LoRA alone)")
    e.add_argument("--scale", type=float, default=1.0)
    e.add_argument("--cfg_pairs", action="store_true",
                   help="shift mode: the guided batch's null half moves with its prompt "
                        "(guidance of the moved model; the UNet batch is [cond; null])")
    c = sub.add_parser("additive")
    c.add_argument("--model", required=True)
    c.add_argument("--classifier_path", required=True)
    c.add_argument("--adapter", default="", help="a shift file to compare with")
    d = sub.add_parser("distill")
    d.add_argument("--offset", required=True, help="a shift adapter's word_adapter.npz")
    d.add_argument("--null_word", default="",
                   help="some of the moved examples take this word alone as their prompt")
    d.add_argument("--word_only_every", type=int, default=2,
                   help="with --null_word: one moved example in this many takes the word alone")
    e.add_argument("--null_word", default="",
                   help="guide prompts that start with this word against the word alone")
    a = ap.parse_args(own)
    if a.cmd == "additive":
        check_additive(a.model, a.classifier_path, adapter_path=a.adapter)
    elif a.cmd == "distill":
        distill(a.offset, rest, a.null_word, a.word_only_every)
    elif a.cmd == "train":
        train(a.word, a.mode, a.unet_lora, rest, a.pixel_prior, a.t_max)
    else:
        evaluate(a.adapter, a.scale, rest, a.cfg_pairs, a.null_word)


if __name__ == "__main__":
    main()
