"""LayerSkip early-exit and self-speculative decoding for Llama models."""
from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("layerskip-kernels")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

from . import ops
from ._ext import cuda_available
from .decoding import GenerationResult, generate
from .model import Llama, LlamaConfig, load_model, load_tokenizer
from .ops.llama_layer import set_num_threads

__all__ = ["GenerationResult", "Llama", "LlamaConfig", "cuda_available", "generate",
           "load_model", "load_tokenizer", "ops", "set_num_threads"]
