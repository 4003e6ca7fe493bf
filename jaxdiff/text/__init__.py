"""Text conditioning outside ``jit``: CLIP's tokenizer (prompts -> ``[B, 77]`` int32 ids) and
the warning about text it truncates (:func:`warn_truncated`)."""

from jaxdiff.text.tokenizer import CLIPTokenizer, TokenizedPrompts, basic_clean
from jaxdiff.text.truncation import truncation_messages, warn_truncated

__all__ = ["CLIPTokenizer", "TokenizedPrompts", "basic_clean", "truncation_messages",
           "warn_truncated"]
