from .generate import GenerationResult, generate

__all__ = ["GenerationResult", "generate"]
