from .checkpoint import load_model, save_hf_directory
from .llama import KVCache, Llama, LlamaConfig
from .tokenizer import load_tokenizer

__all__ = ["KVCache", "Llama", "LlamaConfig", "load_model", "load_tokenizer", "save_hf_directory"]
