"""A small Python client for rarechange.v1: what the CLI, the demo and the tests call."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from PIL import Image

from serving.api import change_detection_pb2 as pb
from serving.api import change_detection_pb2_grpc as pb_grpc
from serving.config import MiB
from serving.server import channel_options

RAW_DTYPES = {"uint8": pb.DTYPE_UINT8, "uint16": pb.DTYPE_UINT16, "float32": pb.DTYPE_FLOAT32}


def image_message(image: bytes | Path | np.ndarray) -> pb.Image:
    """Encoded bytes, a file's bytes, or a numpy array sent raw."""
    if isinstance(image, np.ndarray):
        arr = np.ascontiguousarray(image)
        if arr.dtype.name not in RAW_DTYPES:
            raise ValueError(f"raw arrays must be one of {sorted(RAW_DTYPES)}, got {arr.dtype}")
        raw = pb.RawArray(
            data=arr.astype(arr.dtype.newbyteorder("<")).tobytes(),
            shape=arr.shape,
            dtype=RAW_DTYPES[arr.dtype.name],
        )
        return pb.Image(raw=raw)
    if isinstance(image, Path):
        image = image.read_bytes()
    return pb.Image(encoded=image)


@dataclass
class DetectResult:
    response: pb.DetectChangeResponse

    @property
    def probability(self) -> np.ndarray:
        pm = self.response.probability_map
        if pm.encoding == pb.PROBABILITY_ENCODING_RAW_FLOAT16:
            return np.frombuffer(pm.data, "<f2").reshape(pm.height, pm.width).astype(np.float32)
        return np.asarray(Image.open(io.BytesIO(pm.data)), dtype=np.float32) / 255.0

    @property
    def mask(self) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(self.response.mask_png))) > 0


class ChangeDetectionClient:
    def __init__(self, address: str, max_message_bytes: int = 64 * MiB) -> None:
        self.channel = grpc.insecure_channel(address, options=channel_options(max_message_bytes))
        self.stub = pb_grpc.ChangeDetectionStub(self.channel)

    def detect(
        self,
        before: bytes | Path | np.ndarray,
        after: bytes | Path | np.ndarray,
        *,
        model: str = "",
        stride: int = 0,
        threshold: float | None = None,
        outputs: list[int] | None = None,
        encoding: int = pb.PROBABILITY_ENCODING_PNG8,
        timeout: float | None = 60.0,
    ) -> DetectResult:
        options = pb.DetectOptions(
            model=model, stride=stride, outputs=outputs or [], probability_encoding=encoding
        )
        if threshold is not None:
            options.threshold = threshold
        request = pb.DetectChangeRequest(
            before=image_message(before), after=image_message(after), options=options
        )
        return DetectResult(self.stub.DetectChange(request, timeout=timeout))

    def list_models(self, timeout: float = 10.0) -> list[pb.ModelInfo]:
        return list(self.stub.ListModels(pb.ListModelsRequest(), timeout=timeout).models)

    def wait_ready(self, timeout: float = 30.0) -> None:
        grpc.channel_ready_future(self.channel).result(timeout=timeout)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> ChangeDetectionClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
