"""Named exceptions: the library raises these, the CLI turns them into one line and exit code 1."""

__all__ = [
    "AdapterError",
    "ArgumentError",
    "ChatTemplateLimitError",
    "CheckpointError",
    "ConfigError",
    "ContextLengthError",
    "DraftModelError",
    "HubError",
    "ImageError",
    "LlamaMLXError",
    "MemoryFitError",
    "ModelNotFoundError",
    "OutputExistsError",
    "OutsideModelError",
    "PromptCacheError",
    "RemovalRefusedError",
    "SandboxUnavailableError",
    "ShardError",
    "SpeculativeError",
    "TokenIdError",
    "TokenizerError",
    "UnsafeCheckpointError",
    "UnsafeOutputError",
    "VocabularyMismatchError",
]


class LlamaMLXError(Exception):
    """Base class of every error llama_mlx raises on bad input."""


class CheckpointError(LlamaMLXError):
    """A checkpoint is missing, malformed, truncated, unsafe or inconsistent with its config."""


class AdapterError(CheckpointError):
    """A LoRA/DoRA adapter folder that is missing, malformed, or does not fit the model."""


class ConfigError(CheckpointError):
    """A params.json / config.json is missing, malformed or inconsistent."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle in a .pth file references something other than tensors and plain containers."""


class TokenizerError(LlamaMLXError):
    """A tokenizer file is missing or malformed."""


class ImageError(LlamaMLXError):
    """An image that cannot be used: not an image file, more than one in a message, or given to a
    model that does not see images."""


class ContextLengthError(LlamaMLXError):
    """A prompt does not fit in the model's context."""


class MemoryFitError(LlamaMLXError):
    """A model's weights leave no room for a KV cache in the memory budget (`llama_mlx.fit`)."""


class ModelNotFoundError(LlamaMLXError):
    """A model path or name does not resolve to a model."""


class OutputExistsError(LlamaMLXError):
    """The output of a conversion exists and --force was not given."""


class UnsafeOutputError(LlamaMLXError):
    """An output path is something a save must not replace (a link, device node, FIFO, socket or folder)."""


class HubError(ModelNotFoundError):
    """A Hugging Face hub id cannot be resolved: offline and not cached, unreachable, gated, missing, ambiguous."""


class RemovalRefusedError(LlamaMLXError):
    """`remove_model` was asked to delete something outside the weights folder and the Hugging Face cache."""


class SandboxUnavailableError(LlamaMLXError):
    """The Python tool cannot be confined on this machine (no namespaces, Landlock or sandbox-exec), so it
    does not run."""


class ShardError(LlamaMLXError):
    """A model does not split over the distributed group as asked (heads, KV heads or layers)."""


class OutsideModelError(CheckpointError):
    """A file a checkpoint names (a shard, a tokenizer file) resolves outside the model's folder."""


class VocabularyMismatchError(TokenizerError):
    """The tokenizer produces token ids the model's vocabulary does not have."""


class ChatTemplateLimitError(TokenizerError):
    """A chat template ran past its step, time or output bound."""


class PromptCacheError(LlamaMLXError):
    """A prompt-cache file is truncated, foreign, inconsistent, or saved for another model."""


class ArgumentError(LlamaMLXError, ValueError):
    """An argument is outside the range it may take (a seed, a sampling option)."""


class TokenIdError(ArgumentError):
    """A token id is outside the model's vocabulary."""


class SpeculativeError(LlamaMLXError):
    """Speculative decoding options that cannot work: no or two draft sources, a rotating cache, ..."""


class DraftModelError(SpeculativeError):
    """A draft model that does not share the target's tokenizer and vocabulary."""
