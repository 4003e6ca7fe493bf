"""Text conditioning outside ``jit``: CLIP's tokenizer (prompts -> ``[B, 77]`` int32 ids)."""

from jaxdiff.text.tokenizer import CLIPTokenizer, TokenizedPrompts, basic_clean

__all__ = ["CLIPTokenizer", "TokenizedPrompts", "basic_clean"]
