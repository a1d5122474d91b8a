"""Text encoders for text-to-image Patch Forcing: prompts -> ``pf.conditioning.TextCond``.

``make_text_encoder(name, path, ...)`` loads a frozen encoder from a local folder (MiniLM from
its PyPI package by default); ``CachedTextEncoder`` answers a fixed caption set by lookup.
``transformers`` is imported only when an encoder is built.
"""

from pf.text.cache import CachedTextEncoder, cache_key
from pf.text.encoders import (ENCODER_NAMES, TextEncoder, check_prompts, encoder_from_config, make_text_encoder,
                              minilm_folder)

__all__ = ["TextEncoder", "CachedTextEncoder", "make_text_encoder", "encoder_from_config", "minilm_folder", "cache_key", "check_prompts",
           "ENCODER_NAMES"]
