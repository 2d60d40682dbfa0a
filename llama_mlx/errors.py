"""Named exceptions: the library raises these, the CLI turns them into one line and exit code 1."""


class LlamaMLXError(Exception):
    """Base class of every error llama_mlx raises on bad input."""


class CheckpointError(LlamaMLXError):
    """A checkpoint is missing, malformed, truncated, unsafe or inconsistent with its config."""


class ConfigError(CheckpointError):
    """A params.json / config.json is missing, malformed or inconsistent."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle in a .pth file references something other than tensors and plain containers."""


class TokenizerError(LlamaMLXError):
    """A tokenizer file is missing or malformed."""


class ContextLengthError(LlamaMLXError):
    """A prompt does not fit in the model's context."""


class ModelNotFoundError(LlamaMLXError):
    """A model path or name does not resolve to a model."""


class OutputExistsError(LlamaMLXError):
    """The output of a conversion exists and --force was not given."""


class SpeculativeError(LlamaMLXError):
    """Speculative decoding options that cannot work: no or two draft sources, a rotating cache, ..."""


class DraftModelError(SpeculativeError):
    """A draft model that does not share the target's tokenizer and vocabulary."""
