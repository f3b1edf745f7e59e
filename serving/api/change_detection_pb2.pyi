from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_UINT8: _ClassVar[DType]
    DTYPE_UINT16: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]

class Output(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTPUT_UNSPECIFIED: _ClassVar[Output]
    OUTPUT_TILES: _ClassVar[Output]
    OUTPUT_PROBABILITY_MAP: _ClassVar[Output]
    OUTPUT_MASK: _ClassVar[Output]
    OUTPUT_REGIONS: _ClassVar[Output]

class ProbabilityEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PROBABILITY_ENCODING_UNSPECIFIED: _ClassVar[ProbabilityEncoding]
    PROBABILITY_ENCODING_PNG8: _ClassVar[ProbabilityEncoding]
    PROBABILITY_ENCODING_RAW_FLOAT16: _ClassVar[ProbabilityEncoding]

class MaskRule(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MASK_RULE_UNSPECIFIED: _ClassVar[MaskRule]
    MASK_RULE_THRESHOLD: _ClassVar[MaskRule]
    MASK_RULE_CVA_GATED: _ClassVar[MaskRule]
DTYPE_UNSPECIFIED: DType
DTYPE_UINT8: DType
DTYPE_UINT16: DType
DTYPE_FLOAT32: DType
OUTPUT_UNSPECIFIED: Output
OUTPUT_TILES: Output
OUTPUT_PROBABILITY_MAP: Output
OUTPUT_MASK: Output
OUTPUT_REGIONS: Output
PROBABILITY_ENCODING_UNSPECIFIED: ProbabilityEncoding
PROBABILITY_ENCODING_PNG8: ProbabilityEncoding
PROBABILITY_ENCODING_RAW_FLOAT16: ProbabilityEncoding
MASK_RULE_UNSPECIFIED: MaskRule
MASK_RULE_THRESHOLD: MaskRule
MASK_RULE_CVA_GATED: MaskRule

class RawArray(_message.Message):
    __slots__ = ("data", "shape", "dtype")
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: DType
    def __init__(self, data: _Optional[bytes] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DType, str]] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("encoded", "raw")
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    encoded: bytes
    raw: RawArray
    def __init__(self, encoded: _Optional[bytes] = ..., raw: _Optional[_Union[RawArray, _Mapping]] = ...) -> None: ...

class DetectOptions(_message.Message):
    __slots__ = ("model", "model_version", "stride", "threshold", "outputs", "probability_encoding", "min_region_area_px", "mask_rule")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    STRIDE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_ENCODING_FIELD_NUMBER: _ClassVar[int]
    MIN_REGION_AREA_PX_FIELD_NUMBER: _ClassVar[int]
    MASK_RULE_FIELD_NUMBER: _ClassVar[int]
    model: str
    model_version: str
    stride: int
    threshold: float
    outputs: _containers.RepeatedScalarFieldContainer[Output]
    probability_encoding: ProbabilityEncoding
    min_region_area_px: int
    mask_rule: MaskRule
    def __init__(self, model: _Optional[str] = ..., model_version: _Optional[str] = ..., stride: _Optional[int] = ..., threshold: _Optional[float] = ..., outputs: _Optional[_Iterable[_Union[Output, str]]] = ..., probability_encoding: _Optional[_Union[ProbabilityEncoding, str]] = ..., min_region_area_px: _Optional[int] = ..., mask_rule: _Optional[_Union[MaskRule, str]] = ...) -> None: ...

class DetectChangeRequest(_message.Message):
    __slots__ = ("before", "after", "options", "request_id")
    BEFORE_FIELD_NUMBER: _ClassVar[int]
    AFTER_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    before: Image
    after: Image
    options: DetectOptions
    request_id: str
    def __init__(self, before: _Optional[_Union[Image, _Mapping]] = ..., after: _Optional[_Union[Image, _Mapping]] = ..., options: _Optional[_Union[DetectOptions, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class PixelBox(_message.Message):
    __slots__ = ("row", "col", "height", "width")
    ROW_FIELD_NUMBER: _ClassVar[int]
    COL_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    row: int
    col: int
    height: int
    width: int
    def __init__(self, row: _Optional[int] = ..., col: _Optional[int] = ..., height: _Optional[int] = ..., width: _Optional[int] = ...) -> None: ...

class Tiles(_message.Message):
    __slots__ = ("row", "col", "height", "width", "probability")
    ROW_FIELD_NUMBER: _ClassVar[int]
    COL_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    row: _containers.RepeatedScalarFieldContainer[int]
    col: _containers.RepeatedScalarFieldContainer[int]
    height: _containers.RepeatedScalarFieldContainer[int]
    width: _containers.RepeatedScalarFieldContainer[int]
    probability: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, row: _Optional[_Iterable[int]] = ..., col: _Optional[_Iterable[int]] = ..., height: _Optional[_Iterable[int]] = ..., width: _Optional[_Iterable[int]] = ..., probability: _Optional[_Iterable[float]] = ...) -> None: ...

class ProbabilityMap(_message.Message):
    __slots__ = ("encoding", "data", "height", "width")
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    encoding: ProbabilityEncoding
    data: bytes
    height: int
    width: int
    def __init__(self, encoding: _Optional[_Union[ProbabilityEncoding, str]] = ..., data: _Optional[bytes] = ..., height: _Optional[int] = ..., width: _Optional[int] = ...) -> None: ...

class ChangeRegion(_message.Message):
    __slots__ = ("box", "area_px", "max_probability", "mean_probability")
    BOX_FIELD_NUMBER: _ClassVar[int]
    AREA_PX_FIELD_NUMBER: _ClassVar[int]
    MAX_PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    MEAN_PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    box: PixelBox
    area_px: int
    max_probability: float
    mean_probability: float
    def __init__(self, box: _Optional[_Union[PixelBox, _Mapping]] = ..., area_px: _Optional[int] = ..., max_probability: _Optional[float] = ..., mean_probability: _Optional[float] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("decode_ms", "queue_ms", "inference_ms", "stitch_ms", "total_ms")
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_MS_FIELD_NUMBER: _ClassVar[int]
    STITCH_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    decode_ms: float
    queue_ms: float
    inference_ms: float
    stitch_ms: float
    total_ms: float
    def __init__(self, decode_ms: _Optional[float] = ..., queue_ms: _Optional[float] = ..., inference_ms: _Optional[float] = ..., stitch_ms: _Optional[float] = ..., total_ms: _Optional[float] = ...) -> None: ...

class DetectChangeResponse(_message.Message):
    __slots__ = ("request_id", "model", "model_version", "height", "width", "patch_size", "stride", "threshold", "mask_rule", "gated_cut", "tiles", "probability_map", "mask_png", "regions", "changed_fraction", "timings")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    PATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    STRIDE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MASK_RULE_FIELD_NUMBER: _ClassVar[int]
    GATED_CUT_FIELD_NUMBER: _ClassVar[int]
    TILES_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_MAP_FIELD_NUMBER: _ClassVar[int]
    MASK_PNG_FIELD_NUMBER: _ClassVar[int]
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FRACTION_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    model_version: str
    height: int
    width: int
    patch_size: int
    stride: int
    threshold: float
    mask_rule: MaskRule
    gated_cut: float
    tiles: Tiles
    probability_map: ProbabilityMap
    mask_png: bytes
    regions: _containers.RepeatedCompositeFieldContainer[ChangeRegion]
    changed_fraction: float
    timings: Timings
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., model_version: _Optional[str] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., patch_size: _Optional[int] = ..., stride: _Optional[int] = ..., threshold: _Optional[float] = ..., mask_rule: _Optional[_Union[MaskRule, str]] = ..., gated_cut: _Optional[float] = ..., tiles: _Optional[_Union[Tiles, _Mapping]] = ..., probability_map: _Optional[_Union[ProbabilityMap, _Mapping]] = ..., mask_png: _Optional[bytes] = ..., regions: _Optional[_Iterable[_Union[ChangeRegion, _Mapping]]] = ..., changed_fraction: _Optional[float] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ...) -> None: ...

class ImageDescriptor(_message.Message):
    __slots__ = ("encoded", "raw", "size_bytes")
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    encoded: bool
    raw: RawArray
    size_bytes: int
    def __init__(self, encoded: bool = ..., raw: _Optional[_Union[RawArray, _Mapping]] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class StreamHeader(_message.Message):
    __slots__ = ("options", "before", "after", "request_id")
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    BEFORE_FIELD_NUMBER: _ClassVar[int]
    AFTER_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    options: DetectOptions
    before: ImageDescriptor
    after: ImageDescriptor
    request_id: str
    def __init__(self, options: _Optional[_Union[DetectOptions, _Mapping]] = ..., before: _Optional[_Union[ImageDescriptor, _Mapping]] = ..., after: _Optional[_Union[ImageDescriptor, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class DetectChangeChunk(_message.Message):
    __slots__ = ("header", "before_chunk", "after_chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    BEFORE_CHUNK_FIELD_NUMBER: _ClassVar[int]
    AFTER_CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: StreamHeader
    before_chunk: bytes
    after_chunk: bytes
    def __init__(self, header: _Optional[_Union[StreamHeader, _Mapping]] = ..., before_chunk: _Optional[bytes] = ..., after_chunk: _Optional[bytes] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "patch_size", "channels", "band_names", "input_dtype", "recommended_stride", "default_threshold", "is_default", "backend", "metadata_json", "default_mask_rule")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    BAND_NAMES_FIELD_NUMBER: _ClassVar[int]
    INPUT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    RECOMMENDED_STRIDE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    IS_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    METADATA_JSON_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MASK_RULE_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    patch_size: int
    channels: int
    band_names: _containers.RepeatedScalarFieldContainer[str]
    input_dtype: str
    recommended_stride: int
    default_threshold: float
    is_default: bool
    backend: str
    metadata_json: str
    default_mask_rule: MaskRule
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., patch_size: _Optional[int] = ..., channels: _Optional[int] = ..., band_names: _Optional[_Iterable[str]] = ..., input_dtype: _Optional[str] = ..., recommended_stride: _Optional[int] = ..., default_threshold: _Optional[float] = ..., is_default: bool = ..., backend: _Optional[str] = ..., metadata_json: _Optional[str] = ..., default_mask_rule: _Optional[_Union[MaskRule, str]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...
