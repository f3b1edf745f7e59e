"""The weights digest that ties an ONNX file to its metadata, computable without torch.

Export stores ``weights_sha256`` in the metadata; serving recomputes it from the file's initializers
and refuses a mismatch, so a file whose weights were altered, swapped or damaged after export is
never served under the metadata (threshold, metrics) of another model.
"""

from __future__ import annotations

import hashlib

import onnx
from onnx import numpy_helper


def weights_sha256(model: onnx.ModelProto) -> str:
    """sha256 over every initializer (sorted by name: name, dtype, shape, little-endian bytes).

    The metadata itself is not hashed, so writing it into the file does not change the digest;
    quantized or fp16 variants have other initializers and so their own digest.
    """
    h = hashlib.sha256()
    for init in sorted(model.graph.initializer, key=lambda t: t.name):
        array = numpy_helper.to_array(init)
        h.update(init.name.encode())
        h.update(str(array.dtype.newbyteorder("<")).encode())
        h.update(repr(tuple(array.shape)).encode())
        h.update(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
    return h.hexdigest()


def load_model_bytes(data: bytes, source: str) -> onnx.ModelProto:
    """Parse an ONNX file's bytes; a truncated or foreign file raises ValueError naming it."""
    try:
        return onnx.load_model_from_string(data)
    except Exception as exc:  # protobuf's DecodeError and onnx's own errors
        raise ValueError(f"{source}: not a readable ONNX model ({exc})") from exc
