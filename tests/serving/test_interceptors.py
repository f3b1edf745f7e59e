"""The shared handler rebuilding of the server's interceptors."""

from __future__ import annotations

import grpc
import pytest

from serving.interceptors import behavior_of, kind_of, rebuilt

KINDS = ["unary_unary", "unary_stream", "stream_unary", "stream_stream"]


def parse(data: bytes) -> str:
    return data.decode()


def serialize(text: str) -> bytes:
    return text.encode()


def behave(request: object, context: object) -> str:
    return "served"


@pytest.mark.parametrize("kind", KINDS)
def test_rebuilt_keeps_the_kind_and_the_serializers(kind: str) -> None:
    factory = getattr(grpc, f"{kind}_rpc_method_handler")
    original = factory(behave, request_deserializer=parse, response_serializer=serialize)
    assert kind_of(original) == kind and behavior_of(original) is behave

    def other(request: object, context: object) -> str:
        return "other"

    new = rebuilt(original, other)
    assert kind_of(new) == kind and behavior_of(new) is other
    assert new.request_deserializer is parse and new.response_serializer is serialize
    assert rebuilt(original, other, parse=False).request_deserializer is None
    replaced = rebuilt(original, other, deserializer=str)
    assert replaced.request_deserializer is str


def test_rebuilt_without_a_handler_is_unary() -> None:
    new = rebuilt(None, behave, parse=False)
    assert kind_of(new) == "unary_unary" and new.response_serializer is None
