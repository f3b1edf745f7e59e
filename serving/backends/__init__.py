"""Inference backends: one small interface, several engines (ONNX Runtime in-process by default)."""

from serving.backends.base import Backend, FunctionBackend

__all__ = ["Backend", "FunctionBackend"]
