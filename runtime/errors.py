"""Typed errors of the runtime API. The CLI turns each into one line on stderr and a non-zero exit."""


class GemvgError(Exception):
    """Base of every error gemvg raises on bad input; its message is one line meant for a user."""


class ImageError(GemvgError):
    """An image is missing, unreadable, corrupt, too large or of an unsupported shape."""


class BundleError(GemvgError):
    """A bundle is missing, incomplete, altered (checksum) or of an unknown schema version."""


class PromptTooLongError(GemvgError):
    """The prompt (text + image tokens) plus the tokens to generate exceed the model's context."""


class InputError(GemvgError):
    """Any other bad request: no images, an unknown mode, a bad argument."""


class ProviderError(GemvgError):
    """An execution provider (CUDA, TensorRT) was asked for but is not available."""
