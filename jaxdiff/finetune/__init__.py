"""Fine-tuning a Stable Diffusion folder on your own images: full fine-tuning, LoRA,
DreamBooth and ControlNet training, on the one training loop (:func:`jaxdiff.training.fit`)."""

from jaxdiff.finetune.cache import cache_examples
from jaxdiff.finetune.controlnet import (CONTROLNET_DIR, build_controlnet_task,
                                         check_controlnet_for, conditioning_widths,
                                         controlnet_compat, export_trained_controlnet,
                                         make_controlnet_loss, new_controlnet, params_fingerprint,
                                         sample_controlnet)
from jaxdiff.finetune.dreambooth import (WORD_PRIOR_TARGETS, PairedIterator, WordPrior,
                                         class_image_paths, generate_class_images, resize_mask,
                                         with_prior_flag, with_word_prior)
from jaxdiff.finetune.export import DIFFUSERS_DIR, LORA_FILE, export_finetuned, save_lora_file
from jaxdiff.finetune.loss import (encode_batch, flip_images, make_finetune_loss,
                                   posterior_moments)
from jaxdiff.finetune.modes import (COMPUTE_DTYPES, MODES, FinetuneConfig, compute_configs,
                                    finetuned_pipeline, frozen_params, init_trainable,
                                    lora_patterns, model_params)
from jaxdiff.finetune.objective import (PREDICTION_TYPES, Objective, check_prediction_type,
                                        denoising_terms, objective_weights, reduce_loss)
from jaxdiff.finetune.offset import (fit_latent_offset, learn_word_offset, remove_word,
                                     shifted_prediction)
from jaxdiff.finetune.text_prior import TextPrior, make_text_prior, text_prior_loss
from jaxdiff.finetune.task import (build_finetune_task, finetune_compat, model_identity,
                                   sample_finetuned, step_batch_size)

__all__ = [
    "COMPUTE_DTYPES", "DIFFUSERS_DIR", "LORA_FILE", "MODES", "PREDICTION_TYPES",
    "FinetuneConfig", "Objective", "PairedIterator", "build_finetune_task", "cache_examples",
    "check_prediction_type", "class_image_paths", "compute_configs", "denoising_terms",
    "export_finetuned", "finetune_compat", "finetuned_pipeline", "flip_images", "frozen_params",
    "generate_class_images", "init_trainable", "lora_patterns", "make_finetune_loss",
    "model_identity", "model_params", "objective_weights", "posterior_moments", "reduce_loss",
    "sample_finetuned", "save_lora_file", "step_batch_size", "with_prior_flag",
    "CONTROLNET_DIR", "build_controlnet_task", "check_controlnet_for", "conditioning_widths",
    "controlnet_compat", "encode_batch", "export_trained_controlnet", "make_controlnet_loss",
    "new_controlnet", "params_fingerprint", "sample_controlnet",
    "TextPrior", "make_text_prior", "text_prior_loss", "resize_mask", "with_word_prior",
    "WordPrior", "WORD_PRIOR_TARGETS", "fit_latent_offset", "learn_word_offset", "remove_word",
    "shifted_prediction",
]
