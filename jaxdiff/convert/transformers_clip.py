"""transformers ``CLIPTextModel`` / ``CLIPTextModelWithProjection`` -> jaxdiff
:class:`~jaxdiff.models.CLIPTextConfig` and Flax params.

From a Stable Diffusion folder (needs its files, so not a doctest; ``tests/test_clip_text.py`` and
``tests/parity/test_clip_parity.py`` run the same calls on models built in memory)::

    config, params = load_clip_text_encoder("sd/text_encoder")
    out = CLIPTextModel(config).apply({"params": params}, input_ids)

Weights map by name: the Flax path ``text_model/encoder/layers_0/self_attn/q_proj/kernel`` is the
torch key ``text_model.encoder.layers.0.self_attn.q_proj.weight`` (linear weights transposed,
LayerNorm and embedding weights copied). Both key layouts are accepted: with the ``text_model.``
prefix (SD ``text_encoder/`` checkpoints, transformers 4 and ``CLIPTextModelWithProjection``
state dicts) and without it (transformers 5 ``CLIPTextModel.state_dict()``). The
``embeddings.position_ids`` buffer of older checkpoints is checked (it must be ``arange``) and
dropped. Nothing is left at random init: missing, unexpected or mis-shaped keys are a
``ValueError`` listing every such key.

Config options are mapped, known to have no effect on the forward pass (dropout, initialisation,
generation and bookkeeping fields), or rejected with a ``ValueError`` naming them.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import numpy as np
from flax.traverse_util import flatten_dict

from jaxdiff.convert.torch_io import (
    load_sharded_state_dict,
    load_torch_state_dict,
    match_state_dict,
    to_numpy,
)
from jaxdiff.models.clip_text import clip_text_param_shapes
from jaxdiff.models.clip_text_config import CLIPTextConfig
from jaxdiff.validation import InvalidFileError, read_json

__all__ = [
    "clip_text_config_from_transformers",
    "convert_clip_text_state_dict",
    "clip_text_from_transformers",
    "load_clip_text_encoder",
    "clip_torch_key",
]

# transformers' CLIPTextConfig defaults (what a config.json that omits a key means).
CLIP_TEXT_DEFAULTS: dict[str, Any] = dict(
    vocab_size=49408, hidden_size=512, intermediate_size=2048, projection_dim=512,
    num_hidden_layers=12, num_attention_heads=8, max_position_embeddings=77,
    hidden_act="quick_gelu", layer_norm_eps=1e-5, eos_token_id=49407,
)  # fmt: skip
_MAPPED = set(CLIP_TEXT_DEFAULTS)
# Training-only, initialisation, tokenizer / generation and bookkeeping fields: the forward pass
# of an eval-mode model does not read them (transformers 4 and 5 PretrainedConfig keys included).
_NO_EFFECT = {
    "attention_dropout", "dropout", "initializer_range", "initializer_factor", "bos_token_id",
    "pad_token_id", "sep_token_id", "decoder_start_token_id", "model_type", "architectures",
    "transformers_version", "torch_dtype", "dtype", "use_bfloat16", "return_dict",
    "output_hidden_states", "output_attentions", "torchscript", "tf_legacy_loss", "use_cache",
    "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder", "add_cross_attention",
    "cross_attention_hidden_size", "tie_encoder_decoder", "tie_word_embeddings",
    "gradient_checkpointing", "id2label", "label2id", "num_labels", "problem_type",
    "finetuning_task", "tokenizer_class", "prefix", "task_specific_params", "max_length",
    "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
    "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
    "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens",
}  # fmt: skip
_WITH_PROJECTION = "CLIPTextModelWithProjection"
_ARCHITECTURES = ("CLIPTextModel", _WITH_PROJECTION)
_LIST_RE = re.compile(r"^layers_(\d+)$")
_POSITION_IDS = "text_model.embeddings.position_ids"
_PROJECTION = "text_projection.weight"
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def clip_text_config_from_transformers(
    config: Mapping[str, Any], *, with_projection: bool | None = None, **overrides
) -> CLIPTextConfig:
    """A transformers ``CLIPTextConfig`` (``config.to_dict()`` or a parsed ``config.json``) ->
    :class:`CLIPTextConfig`.

    Args:
      config: the text config; missing keys take transformers' defaults, keys starting with
        ``_`` are metadata.
      with_projection: whether the model has ``text_projection`` (``CLIPTextModelWithProjection``);
        ``None``: from ``architectures`` (``["CLIPTextModelWithProjection"]``), else False.
      overrides: :class:`CLIPTextConfig` fields to set on top (``dtype``, ``param_dtype``,
        ``attention_implementation``).

    Raises:
      ValueError: naming every unknown or unsupported option: a whole ``CLIPConfig`` (it has a
        ``text_config``), ``hidden_act`` other than quick_gelu / gelu, a list ``eos_token_id``,
        ``layer_norm_eps=None``, ``pruned_heads``, an ``architectures`` entry other than the two
        text models.
    """
    if "text_config" in config:
        raise ValueError("config is a full CLIPConfig: pass its 'text_config' instead")
    unknown = sorted(
        k for k in config if not k.startswith("_") and k not in _MAPPED | _NO_EFFECT
        and k != "pruned_heads"
    )  # fmt: skip
    if unknown:
        raise ValueError(f"unknown CLIPTextConfig options: {unknown}")
    c = {**CLIP_TEXT_DEFAULTS, **{k: v for k, v in config.items() if k in _MAPPED}}
    bad = []
    if c["hidden_act"] not in ("quick_gelu", "gelu"):
        bad.append(f"hidden_act={c['hidden_act']!r} (supported: 'quick_gelu', 'gelu')")
    if not isinstance(c["eos_token_id"], (int, np.integer)) or isinstance(c["eos_token_id"], bool):
        bad.append(f"eos_token_id={c['eos_token_id']!r} (supported: one int)")
    if c["layer_norm_eps"] is None:
        bad.append("layer_norm_eps=None (supported: a float > 0)")
    if config.get("pruned_heads"):
        bad.append(f"pruned_heads={config['pruned_heads']!r} (supported: none)")
    archs = config.get("architectures") or []
    if any(a not in _ARCHITECTURES for a in archs):
        bad.append(f"architectures={archs!r} (supported: {list(_ARCHITECTURES)})")
    if bad:
        raise ValueError("unsupported CLIPTextConfig options: " + "; ".join(bad))
    if with_projection is None:
        with_projection = _WITH_PROJECTION in archs
    out = {k: c[k] for k in _MAPPED if k != "projection_dim"}
    out["projection_dim"] = c["projection_dim"] if with_projection else None
    if with_projection and c["projection_dim"] is None:
        raise ValueError("projection_dim=None but the model has a text_projection")
    return CLIPTextConfig(**{**out, **overrides})


def clip_torch_key(path: tuple[str, ...]) -> str:
    """The canonical (``text_model.``-prefixed) transformers key of a Flax param path.

    ``("text_model", "encoder", "layers_3", "mlp", "fc1", "kernel")`` ->
    ``"text_model.encoder.layers.3.mlp.fc1.weight"``.
    """
    parts = [_LIST_RE.sub(r"layers.\1", p) for p in path[:-1]]
    leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(path[-1], path[-1])
    return ".".join([*parts, leaf])


def _canonical(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Keys with the ``text_model.`` prefix; a weight given in both layouts is an error."""
    given, origin, clashes = {}, {}, []
    for key, value in state_dict.items():
        new = key if key.startswith("text_model.") or key == _PROJECTION else f"text_model.{key}"
        if new in given:
            clashes.append(f"{origin[new]} and {key}")
            continue
        given[new], origin[new] = value, key
    if clashes:
        raise ValueError(
            f"state_dict holds {len(clashes)} weights both with and without the 'text_model.' "
            f"prefix: " + "; ".join(sorted(clashes))
        )
    return given


def convert_clip_text_state_dict(
    state_dict: Mapping[str, Any], config: CLIPTextConfig, *, dtype: Any = None
) -> dict:
    """A transformers CLIP text state dict -> the ``"params"`` tree of ``CLIPTextModel(config)``.

    Args:
      state_dict: key -> torch tensor or numpy array, with or without the ``text_model.`` prefix
        (``model.state_dict()``, or :func:`jaxdiff.convert.load_torch_state_dict`).
      config: the target config (``projection_dim`` set iff ``text_projection.weight`` is there).
      dtype: the params' dtype; default ``config.param_dtype``.

    Returns:
      A nested dict of ``jax.Array``, exactly the structure ``CLIPTextModel(config).init`` makes.

    Raises:
      ValueError: listing every missing, unexpected and mis-shaped key; for a weight given under
        both layouts; for a ``position_ids`` buffer that is not ``arange``.
    """
    dtype = np.dtype(config.param_dtype if dtype is None else dtype)
    given = _canonical(state_dict)
    if _POSITION_IDS in given:
        ids = to_numpy(given.pop(_POSITION_IDS))
        if ids.reshape(-1).tolist() != list(range(ids.size)):
            raise ValueError(f"{_POSITION_IDS} must be arange(max_position_embeddings)")
    shapes = flatten_dict(clip_text_param_shapes(config))
    expected = {clip_torch_key(p): (p, tuple(s.shape)) for p, s in shapes.items()}
    return match_state_dict(given, expected, dtype=dtype, what="the CLIP text config")


def clip_text_from_transformers(
    model, *, dtype: Any = None, param_dtype: Any = None, attention_implementation=None
) -> tuple[CLIPTextConfig, dict]:
    """``(config, params)`` from an instantiated transformers ``CLIPTextModel`` or
    ``CLIPTextModelWithProjection`` (its config and ``state_dict()``; the projection head is
    taken iff the model has a ``text_projection``).

    ``dtype`` / ``param_dtype`` / ``attention_implementation`` set those config fields (float32
    and the XLA path by default).
    """
    overrides = {
        k: v
        for k, v in (("dtype", dtype), ("param_dtype", param_dtype),
                     ("attention_implementation", attention_implementation))
        if v is not None
    }  # fmt: skip
    config = clip_text_config_from_transformers(
        model.config.to_dict(), with_projection=hasattr(model, "text_projection"), **overrides
    )
    return config, convert_clip_text_state_dict(model.state_dict(), config)


def load_clip_text_encoder(
    path: str | os.PathLike,
    *,
    weights: str | None = None,
    dtype: Any = None,
    param_dtype: Any = None,
    attention_implementation: str | None = None,
) -> tuple[CLIPTextConfig, dict]:
    """``(config, params)`` from a ``text_encoder/`` (or ``text_encoder_2/``) folder: its
    ``config.json`` and its weights, with no network.

    Args:
      path: the folder.
      weights: the weights file name inside ``path``; default ``model.safetensors``, else
        ``pytorch_model.bin`` (a sharded ``model.safetensors.index.json`` is followed too).
      dtype, param_dtype, attention_implementation: config fields to set.

    The projection head is taken when ``architectures`` names ``CLIPTextModelWithProjection``,
    or, when the config has no ``architectures``, when the weights hold ``text_projection``.

    Raises:
      ValueError: naming the folder / file when ``config.json`` or the weights are missing; and
        the errors of :func:`clip_text_config_from_transformers` and
        :func:`convert_clip_text_state_dict`.
      jaxdiff.validation.InvalidFileError: (a ``ValueError``) ``config.json`` is not a JSON
        object, or a weights file is invalid (:func:`jaxdiff.convert.load_torch_state_dict`,
        :func:`jaxdiff.convert.load_sharded_state_dict`).
    """
    path = os.fspath(path)
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise ValueError(f"path {path!r} has no config.json")
    raw = read_json(config_file)
    if not isinstance(raw, Mapping):
        raise InvalidFileError(f"{config_file}: expected a JSON object (a CLIP text config)")
    state_dict = _load_weights(path, weights)
    with_projection = None if raw.get("architectures") else _PROJECTION in state_dict
    overrides = {
        k: v
        for k, v in (("dtype", dtype), ("param_dtype", param_dtype),
                     ("attention_implementation", attention_implementation))
        if v is not None
    }  # fmt: skip
    config = clip_text_config_from_transformers(raw, with_projection=with_projection, **overrides)
    return config, convert_clip_text_state_dict(state_dict, config)


def _load_weights(path: str, weights: str | None) -> dict[str, np.ndarray]:
    if weights is None:
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(index):
            return load_sharded_state_dict(index)
        found = [n for n in _WEIGHT_FILES if os.path.isfile(os.path.join(path, n))]
        if not found:
            raise ValueError(f"path {path!r} holds none of {list(_WEIGHT_FILES)}; pass weights=")
        weights = found[0]
    file = os.path.join(path, weights)
    if not os.path.isfile(file):
        raise ValueError(f"weights file {file!r} does not exist")
    return load_torch_state_dict(file)
