"""soup_run: run exported Soup-of-Experts specialists with onnxruntime, numpy and tokenizers only."""
from soup_run.errors import RunError
from soup_run.generate import GenerationConfig, generate, stream
from soup_run.model import Specialist

__all__ = ["GenerationConfig", "RunError", "Specialist", "generate", "stream"]
