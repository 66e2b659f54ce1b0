"""CPU backend: the traced graphs lowered to ONNX and run by onnxruntime."""

from glmc.backends.cpu.lower import lower
from glmc.backends.cpu.runtime import load

__all__ = ["lower", "load"]
