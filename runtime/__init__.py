"""gemvg.runtime: the lean grounding engine (numpy, pillow, onnxruntime, tokenizers; no torch)."""

from .engine import Engine, GroundingResult, KVCache, ModelInputs
from .errors import BundleError, GemvgError, ImageError, InputError, PromptTooLongError, ProviderError
from .grounding import Box, ImageGeometry, build_instruction, format_answer, parse_answer
from .manifest import Manifest, load_manifest

__all__ = [
    "Box", "BundleError", "Engine", "GemvgError", "GroundingResult", "ImageError", "ImageGeometry", "InputError",
    "KVCache", "Manifest", "ModelInputs", "PromptTooLongError", "ProviderError", "build_instruction",
    "format_answer", "load_manifest", "parse_answer",
]
