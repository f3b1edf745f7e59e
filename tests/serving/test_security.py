"""TLS, mutual TLS and the bearer token against a real server, with certificates made here."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from click.testing import CliRunner
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import ValidationError

from serving import kserve
from serving.api import change_detection_pb2 as pb
from serving.api import grpc_predict_v2_pb2 as kpb
from serving.cli.main import cli
from serving.client import ChangeDetectionClient
from serving.config import ServerSettings
from serving.pictures import encode_png
from serving.security import InvalidCredentials, server_credentials
from serving.server import SERVICE_NAME
from training.synthetic import SceneConfig, render_pair

x509 = pytest.importorskip("cryptography.x509")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: E402

TOKEN = "s3cret-token_for.tests"
ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "synthetic-thin" / "model.onnx"


# ------------------------------------------------------------------ certificates


@dataclass
class Issued:
    cert: Path
    key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _issue(
    folder: Path,
    stem: str,
    cn: str,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    usage: x509.ObjectIdentifier | None = None,
    san: list[x509.GeneralName] | None = None,
) -> tuple[Issued, x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A P-256 key and a certificate for it, self-signed when ``issuer`` is None; PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    issuer_cert, issuer_key = issuer if issuer else (None, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer_cert.subject if issuer_cert else _name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    cert = builder.sign(issuer_key, hashes.SHA256())
    paths = Issued(folder / f"{stem}.crt", folder / f"{stem}.key")
    paths.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths, cert, key


@dataclass
class Pki:
    ca: Path
    server: Issued
    client: Issued
    other_ca: Path
    other_client: Issued  # signed by other_ca


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca, ca_cert, ca_key = _issue(d, "ca", "rarechange test CA", None, ca=True)
    server, _, _ = _issue(
        d,
        "server",
        "localhost",
        (ca_cert, ca_key),
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
        san=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
    )
    client, _, _ = _issue(
        d, "client", "client", (ca_cert, ca_key), usage=ExtendedKeyUsageOID.CLIENT_AUTH
    )
    other, other_cert, other_key = _issue(d, "other-ca", "another CA", None, ca=True)
    other_client, _, _ = _issue(
        d,
        "other-client",
        "intruder",
        (other_cert, other_key),
        usage=ExtendedKeyUsageOID.CLIENT_AUTH,
    )
    return Pki(ca.cert, server, client, other.cert, other_client)


@pytest.fixture(scope="module")
def pair():
    return render_pair(5, SceneConfig(height=96, width=128, n_changes=2))


def _call(client: ChangeDetectionClient) -> grpc.StatusCode:
    """One cheap RPC; OK or the status it failed with."""
    try:
        client.list_models(timeout=10)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


# ------------------------------------------------------------------ TLS


def test_tls_client_with_the_right_ca_succeeds(start_server, pki: Pki, pair) -> None:
    server = start_server(tls_cert=pki.server.cert, tls_key=pki.server.key)
    assert server.security == "TLS"
    with ChangeDetectionClient(server.address, tls_ca=pki.ca) as client:
        result = client.detect(encode_png(pair.before), encode_png(pair.after))
        assert result.mask.shape == (96, 128)
    # the certificate's DNS name, checked when dialling an address it does not name
    with ChangeDetectionClient(
        server.address, tls_ca=pki.ca, server_name_override="localhost"
    ) as client:
        assert _call(client) == grpc.StatusCode.OK


def test_tls_server_refuses_plaintext_and_unknown_cas(start_server, pki: Pki) -> None:
    server = start_server(tls_cert=pki.server.cert, tls_key=pki.server.key)
    with ChangeDetectionClient(server.address) as plaintext:
        assert _call(plaintext) == grpc.StatusCode.UNAVAILABLE
    with ChangeDetectionClient(server.address, tls_ca=pki.other_ca) as wrong_ca:
        assert _call(wrong_ca) == grpc.StatusCode.UNAVAILABLE
    with ChangeDetectionClient(
        server.address, tls_ca=pki.ca, server_name_override="not-the-server"
    ) as wrong_name:
        assert _call(wrong_name) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_needs_a_client_cert_from_the_ca(start_server, pki: Pki) -> None:
    server = start_server(tls_cert=pki.server.cert, tls_key=pki.server.key, tls_client_ca=pki.ca)
    assert server.security == "mutual TLS"
    with ChangeDetectionClient(server.address, tls_ca=pki.ca) as no_cert:
        assert _call(no_cert) == grpc.StatusCode.UNAVAILABLE
    with ChangeDetectionClient(
        server.address,
        tls_ca=pki.ca,
        tls_cert=pki.other_client.cert,
        tls_key=pki.other_client.key,
    ) as foreign:
        assert _call(foreign) == grpc.StatusCode.UNAVAILABLE
    with ChangeDetectionClient(
        server.address, tls_ca=pki.ca, tls_cert=pki.client.cert, tls_key=pki.client.key
    ) as client:
        assert _call(client) == grpc.StatusCode.OK
        assert client.get_model().name


# ------------------------------------------------------------------ bearer token


def test_token_is_required_and_checked(start_server, pair) -> None:
    server = start_server(auth_token=TOKEN)
    assert server.security == "plaintext, bearer token"
    before, after = encode_png(pair.before), encode_png(pair.after)
    for token, problem in ((None, "requires a bearer token"), ("wrong", "invalid bearer token")):
        with ChangeDetectionClient(server.address, token=token) as client:
            for rpc in (
                lambda c: c.list_models(),
                lambda c: c.get_model("no-such-model"),  # refused before the lookup
                lambda c: c.detect(before, after),
                lambda c: c.detect_stream(before, after, chunk_bytes=500),  # client streaming
            ):
                with pytest.raises(grpc.RpcError) as err:
                    rpc(client)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert problem in err.value.details()
    with ChangeDetectionClient(server.address, token=TOKEN) as client:
        assert client.list_models()
        assert client.detect(before, after).mask.shape == (96, 128)
        streamed = client.detect_stream(before, after, chunk_bytes=500)
        assert streamed.response.mask_png


def test_token_from_a_file(start_server, tmp_path: Path) -> None:
    """A mounted secret: the token never sits in the environment or on the command line."""
    secret = tmp_path / "token"
    secret.write_text(TOKEN + "\n")  # kubectl-created secrets often end with a newline
    server = start_server(auth_token_file=secret)
    with ChangeDetectionClient(server.address, token=TOKEN) as client:
        assert client.list_models()
    with ChangeDetectionClient(server.address, token="wrong") as client:
        with pytest.raises(grpc.RpcError) as err:
            client.list_models()
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    empty = tmp_path / "empty"
    empty.write_text("\n")
    for kwargs, problem in (
        ({"auth_token_file": empty}, "is empty"),
        ({"auth_token_file": tmp_path / "absent"}, "not a readable file"),
        ({"auth_token_file": secret, "auth_token": TOKEN}, "set one, not both"),
    ):
        with pytest.raises(ValidationError, match=problem):
            ServerSettings(**kwargs)


def test_malformed_authorization_is_unauthenticated(start_server) -> None:
    server = start_server(auth_token=TOKEN)
    with grpc.insecure_channel(server.address) as channel:
        stub = channel.unary_unary(
            f"/{SERVICE_NAME}/ListModels",
            request_serializer=pb.ListModelsRequest.SerializeToString,
            response_deserializer=pb.ListModelsResponse.FromString,
        )
        for metadata in (
            [("authorization", TOKEN)],  # no scheme
            [("authorization", f"Basic {TOKEN}")],
            [("authorization", "Bearer ")],
            [("authorization", f"Bearer {TOKEN}x")],
            [("authorization", f"Bearer {TOKEN[:-1]}")],
        ):
            with pytest.raises(grpc.RpcError) as err:
                stub(pb.ListModelsRequest(), metadata=metadata, timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, metadata
        # the scheme is case-insensitive, as in HTTP
        assert stub(pb.ListModelsRequest(), metadata=[("authorization", f"bearer {TOKEN}")])


def test_health_and_reflection_stay_open_without_the_token(start_server) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    server = start_server(auth_token=TOKEN)
    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        answer = next(iter(reflection.ServerReflectionInfo(iter([request]), timeout=5)))
        names = {s.name for s in answer.list_services_response.service}
        assert SERVICE_NAME in names


def test_tls_and_token_together(start_server, pki: Pki) -> None:
    server = start_server(tls_cert=pki.server.cert, tls_key=pki.server.key, auth_token=TOKEN)
    assert server.security == "TLS, bearer token"
    with ChangeDetectionClient(server.address, tls_ca=pki.ca) as client:
        assert _call(client) == grpc.StatusCode.UNAUTHENTICATED
    with ChangeDetectionClient(server.address, tls_ca=pki.ca, token=TOKEN) as client:
        assert _call(client) == grpc.StatusCode.OK


# ------------------------------------------------------------------ settings


def test_settings_errors_name_the_setting(tmp_path: Path, pki: Pki) -> None:
    with pytest.raises(ValidationError, match="tls_cert and tls_key"):
        ServerSettings(tls_cert=pki.server.cert)
    with pytest.raises(ValidationError, match="tls_cert and tls_key"):
        ServerSettings(tls_key=pki.server.key)
    with pytest.raises(ValidationError, match="tls_client_ca"):
        ServerSettings(tls_client_ca=pki.ca)
    missing = tmp_path / "missing.crt"
    with pytest.raises(ValidationError, match=r"tls_cert: .*missing\.crt is not a readable file"):
        ServerSettings(tls_cert=missing, tls_key=pki.server.key)
    with pytest.raises(ValidationError, match=r"tls_client_ca: .* is not a readable file"):
        ServerSettings(tls_cert=pki.server.cert, tls_key=pki.server.key, tls_client_ca=tmp_path)
    not_pem = tmp_path / "key.der"
    not_pem.write_bytes(b"\x30\x82 not pem")
    settings = ServerSettings(tls_cert=pki.server.cert, tls_key=not_pem)
    with pytest.raises(InvalidCredentials, match=r"tls_key: .* holds no PEM PRIVATE KEY"):
        server_credentials(settings)
    # a valid key that is not the certificate's: refused here, not as gRPC's "cannot bind"
    mismatched = ServerSettings(tls_cert=pki.server.cert, tls_key=pki.client.key)
    with pytest.raises(InvalidCredentials, match=r"tls_cert/tls_key: .* not a certificate and its"):
        server_credentials(mismatched)
    wrong_ca = ServerSettings(
        tls_cert=pki.server.cert, tls_key=pki.server.key, tls_client_ca=pki.server.key
    )
    with pytest.raises(InvalidCredentials, match=r"tls_client_ca: .* no PEM CERTIFICATE"):
        server_credentials(wrong_ca)
    assert server_credentials(ServerSettings()) is None


def test_client_refuses_half_a_key_pair(pki: Pki) -> None:
    with pytest.raises(ValueError, match="tls_cert and tls_key"):
        ChangeDetectionClient("127.0.0.1:1", tls_ca=pki.ca, tls_cert=pki.client.cert)
    with pytest.raises(ValueError, match="only applies to TLS"):
        ChangeDetectionClient("127.0.0.1:1", server_name_override="localhost")
    with pytest.raises(ValueError, match="token"):
        ChangeDetectionClient("127.0.0.1:1", token="two words")


# ------------------------------------------------------------------ the CLI


def _pair_files(tmp_path: Path, pair) -> tuple[str, str]:
    before, after = tmp_path / "before.png", tmp_path / "after.png"
    before.write_bytes(encode_png(pair.before))
    after.write_bytes(encode_png(pair.after))
    return str(before), str(after)


def test_cli_detect_with_tls_and_token(start_server, pki: Pki, pair, tmp_path: Path) -> None:
    from PIL import Image

    server = start_server(tls_cert=pki.server.cert, tls_key=pki.server.key, auth_token=TOKEN)
    before, after = _pair_files(tmp_path, pair)
    out = tmp_path / "out"
    args = ["detect", before, after, "--server", server.address, "--tls-ca", str(pki.ca)]
    result = CliRunner(env={"RARECHANGE_TOKEN": TOKEN}).invoke(cli, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [  # no temporary files left behind
        "mask.png",
        "overlay.png",
        "probability.png",
        "regions.json",
    ]
    mask = np.asarray(Image.open(out / "mask.png")) > 0
    assert mask.shape == (96, 128)
    assert np.asarray(Image.open(out / "overlay.png")).shape[:2] == (96, 3 * 128 + 2 * 8)
    report = json.loads((out / "regions.json").read_text())
    with ChangeDetectionClient(server.address, tls_ca=pki.ca, token=TOKEN) as client:
        default = client.get_model()
    assert report["model"] == {"name": default.name, "version": default.version}
    assert report["image"] == {"height": 96, "width": 128}
    assert report["changed_fraction"] == pytest.approx(mask.mean(), abs=1e-6)
    assert report["timings_ms"]["total"] >= report["timings_ms"]["inference"] > 0
    assert sum(r["area_px"] for r in report["regions"]) == mask.sum()
    for region in report["regions"]:
        box = region["bbox"]
        assert set(box) == {"row", "col", "height", "width"}
        inside = mask[
            box["row"] : box["row"] + box["height"], box["col"] : box["col"] + box["width"]
        ]
        assert 0 < region["area_px"] <= inside.sum()
        assert 0 <= region["mean_probability"] <= region["max_probability"] <= 1

    # the same server without the token: a clear refusal, exit 1, nothing written
    refused = tmp_path / "refused"
    result = CliRunner(env={"RARECHANGE_TOKEN": None}).invoke(cli, [*args, "--out", str(refused)])
    assert result.exit_code == 1
    assert "UNAUTHENTICATED" in result.output and "--token" in result.output
    assert not refused.exists()


def test_cli_detect_errors_name_the_status(start_server, pair, tmp_path: Path) -> None:
    server = start_server()
    before, after = _pair_files(tmp_path, pair)
    runner = CliRunner(env={"RARECHANGE_TOKEN": None})
    base = ["detect", before, after, "--out", str(tmp_path / "out")]
    result = runner.invoke(cli, [*base, "--server", server.address, "--model", "nope"])
    assert result.exit_code == 1
    assert "NOT_FOUND" in result.output and "nope" in result.output
    result = runner.invoke(cli, [*base, "--address", server.address, "--threshold", "1.5"])
    assert result.exit_code == 1 and "INVALID_ARGUMENT" in result.output
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        free = f"127.0.0.1:{s.getsockname()[1]}"
    result = runner.invoke(cli, [*base, "--server", free, "--timeout", "5"])
    assert result.exit_code == 3
    assert "UNAVAILABLE: could not reach the server" in result.output


def test_token_check_covers_every_call_kind() -> None:
    """Unary and streaming, either way: the Open Inference Protocol adds a bidi stream."""
    from concurrent import futures

    from serving.security import BearerTokenInterceptor

    def echo(request, context):
        return request

    def echo_stream(request, context):
        yield request

    def join(requests, context):
        return b"".join(requests)

    def echo_all(requests, context):
        yield from requests

    handlers = {
        "UU": grpc.unary_unary_rpc_method_handler(echo),
        "US": grpc.unary_stream_rpc_method_handler(echo_stream),
        "SU": grpc.stream_unary_rpc_method_handler(join),
        "SS": grpc.stream_stream_rpc_method_handler(echo_all),
    }
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=2), interceptors=[BearerTokenInterceptor(TOKEN)]
    )
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("t.Svc", handlers)])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            calls = {
                "UU": lambda md: ch.unary_unary("/t.Svc/UU")(b"a", metadata=md, timeout=5),
                "US": lambda md: b"".join(ch.unary_stream("/t.Svc/US")(b"a", metadata=md)),
                "SU": lambda md: ch.stream_unary("/t.Svc/SU")(iter([b"a"]), metadata=md),
                "SS": lambda md: b"".join(ch.stream_stream("/t.Svc/SS")(iter([b"a"]), metadata=md)),
                # an unknown method is refused too, not reported as UNIMPLEMENTED
                "??": lambda md: ch.unary_unary("/t.Svc/Nope")(b"a", metadata=md, timeout=5),
            }
            for kind, call in calls.items():
                with pytest.raises(grpc.RpcError) as err:
                    call([])
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, kind
                if kind != "??":
                    assert call([("authorization", f"Bearer {TOKEN}")]) == b"a", kind
    finally:
        server.stop(0)


# ------------------------------------------------------------------ every method, every call kind

Code = grpc.StatusCode
_KSERVE = kpb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
_RARECHANGE = pb.DESCRIPTOR.services_by_name["ChangeDetection"]
GUARDED = [
    (f"/{service.full_name}/{method.name}", method.client_streaming)
    for service in (_RARECHANGE, _KSERVE)
    for method in service.methods
]
"""Every method of both APIs, with whether the client streams."""
NOT_SERVED = [  # Triton's extensions this server does not offer, and a made-up service
    f"/{kserve.SERVICE_NAME}/ModelStreamInfer",
    f"/{kserve.SERVICE_NAME}/RepositoryIndex",
    "/rarechange.v1.Admin/Shutdown",
]
JUNK = b"\xff\xff\xff"  # not a valid protocol buffer


def _junk_call(
    channel: grpc.Channel, method: str, client_streaming: bool, metadata: tuple = ()
) -> grpc.StatusCode:
    """Send JUNK to ``method``; the status the call ends with."""
    try:
        if client_streaming:
            channel.stream_unary(method)(iter([JUNK]), metadata=metadata, timeout=10)
        else:
            channel.unary_unary(method)(JUNK, metadata=metadata, timeout=10)
    except grpc.RpcError as exc:
        return exc.code()
    return Code.OK


def _kserve_call(channel: grpc.Channel, name: str, request: object, metadata: tuple = ()) -> object:
    reply = getattr(kpb, name + "Response")
    stub = channel.unary_unary(
        f"/{kserve.SERVICE_NAME}/{name}",
        request_serializer=type(request).SerializeToString,
        response_deserializer=reply.FromString,
    )
    return stub(request, metadata=metadata, timeout=10)


def _patch_pair(n: int = 2) -> kpb.ModelInferRequest:
    request = kpb.ModelInferRequest(model_name="synthetic-thin")
    for name in ("before", "after"):
        request.inputs.add(name=name, datatype="UINT8", shape=[n, 3, 32, 32])
        request.raw_input_contents.append(bytes(n * 3 * 32 * 32))
    return request


def test_token_guards_every_method_of_both_apis(start_server) -> None:
    """The Open Inference Protocol as much as rarechange.v1, and methods nobody serves: refused
    before a byte is parsed (junk here), so a refusal tells nothing of the schema or methods."""
    assert (
        len(GUARDED) == 4 + 6
        and ("/rarechange.v1.ChangeDetection/DetectChangeStream", True) in GUARDED
    )
    server = start_server(auth_token=TOKEN)
    wrong = [(), (("authorization", "Bearer wrong"),), (("authorization", TOKEN),)]
    good = (("authorization", f"Bearer {TOKEN}"),)
    with grpc.insecure_channel(server.address) as channel:
        for method, streaming in [*GUARDED, *((m, False) for m in NOT_SERVED)]:
            for metadata in wrong:
                code = _junk_call(channel, method, streaming, metadata)
                assert code == Code.UNAUTHENTICATED, (method, metadata, code)
        # with the token the junk is parsed, and refused as junk; what is not served is not
        for method, streaming in GUARDED:
            assert _junk_call(channel, method, streaming, good) == Code.INVALID_ARGUMENT, method
        for method in NOT_SERVED:
            assert _junk_call(channel, method, False, good) == Code.UNIMPLEMENTED, method
        # and every KServe call answers with the token
        assert _kserve_call(channel, "ServerLive", kpb.ServerLiveRequest(), good).live
        assert _kserve_call(channel, "ServerReady", kpb.ServerReadyRequest(), good).ready
        ready = kpb.ModelReadyRequest(name="synthetic-thin")
        assert _kserve_call(channel, "ModelReady", ready, good).ready
        server_meta = _kserve_call(channel, "ServerMetadata", kpb.ServerMetadataRequest(), good)
        assert server_meta.name == "rarechange"
        meta = kpb.ModelMetadataRequest(name="synthetic-thin")
        assert _kserve_call(channel, "ModelMetadata", meta, good).name == "synthetic-thin"
        answer = _kserve_call(channel, "ModelInfer", _patch_pair(), good)
        assert list(answer.outputs[0].shape) == [2]
        with pytest.raises(grpc.RpcError) as err:  # the same valid call without the token
            _kserve_call(channel, "ModelInfer", _patch_pair())
        assert err.value.code() == Code.UNAUTHENTICATED


def _tls_channel(address: str, pki: Pki, client: Issued | None) -> grpc.Channel:
    key = client.key.read_bytes() if client else None
    chain = client.cert.read_bytes() if client else None
    credentials = grpc.ssl_channel_credentials(pki.ca.read_bytes(), key, chain)
    return grpc.secure_channel(address, credentials)


def _every_call_kind(channel: grpc.Channel) -> dict[str, Callable[[], object]]:
    """One call of each kind, open services included; each returns what it received."""
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    detect = channel.unary_unary(
        f"/{SERVICE_NAME}/DetectChange",
        request_serializer=pb.DetectChangeRequest.SerializeToString,
        response_deserializer=pb.DetectChangeResponse.FromString,
    )
    detect_stream = channel.stream_unary(
        f"/{SERVICE_NAME}/DetectChangeStream",
        request_serializer=pb.DetectChangeChunk.SerializeToString,
        response_deserializer=pb.DetectChangeResponse.FromString,
    )
    health = health_pb2_grpc.HealthStub(channel)
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    listing = reflection_pb2.ServerReflectionRequest(list_services="")
    return {
        "unary": lambda: detect(pb.DetectChangeRequest(), timeout=10),
        "client streaming": lambda: detect_stream(iter([pb.DetectChangeChunk()]), timeout=10),
        "KServe ModelInfer": lambda: _kserve_call(channel, "ModelInfer", _patch_pair()),
        "KServe ServerLive": lambda: _kserve_call(channel, "ServerLive", kpb.ServerLiveRequest()),
        "health": lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=10),
        "server streaming (health Watch)": lambda: next(
            iter(health.Watch(health_pb2.HealthCheckRequest(), timeout=10))
        ),
        "bidi streaming (reflection)": lambda: next(
            iter(reflection.ServerReflectionInfo(iter([listing]), timeout=10))
        ),
    }


def test_mutual_tls_refuses_every_call_kind_without_a_client_certificate(
    start_server, pki: Pki
) -> None:
    """The TLS handshake refuses, before any call reaches Python: health and reflection too."""
    server = start_server(tls_cert=pki.server.cert, tls_key=pki.server.key, tls_client_ca=pki.ca)
    for client in (None, pki.other_client):  # no certificate; one from another CA
        with _tls_channel(server.address, pki, client) as channel:
            for kind, call in _every_call_kind(channel).items():
                with pytest.raises(grpc.RpcError) as err:
                    call()
                assert err.value.code() == Code.UNAVAILABLE, (kind, client)
    with _tls_channel(server.address, pki, pki.client) as channel:
        calls = _every_call_kind(channel)
        for kind in ("unary", "client streaming"):  # reached the servicer: refused as empty
            with pytest.raises(grpc.RpcError) as err:
                calls[kind]()
            assert err.value.code() == Code.INVALID_ARGUMENT, kind
        assert list(calls["KServe ModelInfer"]().outputs[0].shape) == [2]
        assert calls["KServe ServerLive"]().live
        assert calls["health"]().status == health_pb2.HealthCheckResponse.SERVING
        assert calls["server streaming (health Watch)"]().status == (
            health_pb2.HealthCheckResponse.SERVING
        )
        listed = calls["bidi streaming (reflection)"]().list_services_response.service
        assert SERVICE_NAME in {s.name for s in listed}


# ------------------------------------------------------------------ no request reads a file


@dataclass
class Sandbox:
    models: Path  # the server's models folder, with one model
    outside: Path  # beside it: a loadable model and a secret that no request may reach


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Sandbox:
    root = tmp_path_factory.mktemp("sandbox")
    models, outside = root / "models", root / "outside"
    (models / "synthetic-thin").mkdir(parents=True)
    shutil.copy(MODEL, models / "synthetic-thin" / "model.onnx")
    (outside / "stolen").mkdir(parents=True)
    shutil.copy(MODEL, outside / "stolen" / "model.onnx")
    (outside / "secret.txt").write_text("no request may read this\n")
    return Sandbox(models, outside)


def path_probes(box: Sandbox) -> list[str]:
    """Names of files and folders that exist, traversals, absolute paths, URLs, GDAL's virtual
    file systems: what a client might put in any string field to make the server read a file."""
    model = box.models / "synthetic-thin"
    return [
        *("../outside/stolen", "../outside/secret.txt", "../../../../../../../../etc/passwd"),
        str(box.outside / "stolen"),
        str(box.outside / "stolen" / "model.onnx"),
        str(box.outside / "secret.txt"),
        *("/etc/passwd", "/etc/hostname", "/proc/self/environ", "/dev/zero", "~/.ssh/id_rsa"),
        f"file://{box.outside}/secret.txt",
        "file:///etc/passwd",
        *("synthetic-thin/../../outside/stolen", "./synthetic-thin", "synthetic-thin/"),
        *("synthetic-thin/model.onnx", str(model), str(model / "model.onnx"), "model.onnx"),
        *(".", "..", "/", "..\\outside\\stolen", "C:\\Windows\\win.ini", "\\\\host\\share\\m.onnx"),
        *("%2e%2e%2foutside%2fstolen", "s3://bucket/model.onnx", "http://127.0.0.1:9/m.onnx"),
        *("/vsicurl/http://127.0.0.1:9/x.tif", "/vsimem/x.tif", "/vsizip//etc/x.zip"),
        "outside\x00.onnx",
    ]


def _unknown_string_field(text: str) -> bytes:
    """Field 1 as a length-delimited string, for a message that has no field 1 (kept unknown)."""
    data, length, prefix = text.encode(), len(text.encode()), b""
    while True:
        byte, length = length & 0x7F, length >> 7
        prefix += bytes([byte | (0x80 if length else 0)])
        if not length:
            return b"\x0a" + prefix + data


CALLS_PER_PROBE = 20


def _probe_every_field(address: str, probes: list[str]) -> int:
    """Each probe in every string field a request has; each gets the status it should.

    Returns the number of calls made (CALLS_PER_PROBE for each probe).
    """
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    png = encode_png(np.zeros((8, 8, 3), np.uint8))
    image = pb.Image(encoded=png)
    calls = 0
    with grpc.insecure_channel(address) as channel:

        def call(method: str, request: object, reply: type, expected: Code) -> object:
            nonlocal calls
            calls += 1
            serialize = None if isinstance(request, bytes) else type(request).SerializeToString
            stub = channel.unary_unary(
                method, request_serializer=serialize, response_deserializer=reply.FromString
            )
            try:
                response = stub(request, timeout=30)
            except grpc.RpcError as exc:
                assert exc.code() == expected, (method, request, exc.code(), exc.details())
                return None
            assert expected == Code.OK, (method, request, "OK")
            return response

        def chunks(options: pb.DetectOptions) -> list[pb.DetectChangeChunk]:
            descriptor = pb.ImageDescriptor(encoded=True, size_bytes=len(png))
            header = pb.StreamHeader(options=options, before=descriptor, after=descriptor)
            return [
                pb.DetectChangeChunk(header=header),
                pb.DetectChangeChunk(before_chunk=png),
                pb.DetectChangeChunk(after_chunk=png),
            ]

        detect = f"/{SERVICE_NAME}/DetectChange"
        infer = f"/{kserve.SERVICE_NAME}/ModelInfer"
        stream = channel.stream_unary(
            f"/{SERVICE_NAME}/DetectChangeStream",
            request_serializer=pb.DetectChangeChunk.SerializeToString,
            response_deserializer=pb.DetectChangeResponse.FromString,
        )
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo
        for probe in probes:
            unknown = _unknown_string_field(probe)
            for options in (pb.DetectOptions(model=probe), pb.DetectOptions(model_version=probe)):
                request = pb.DetectChangeRequest(before=image, after=image, options=options)
                call(detect, request, pb.DetectChangeResponse, Code.NOT_FOUND)
                with pytest.raises(grpc.RpcError) as err:
                    calls += 1
                    stream(iter(chunks(options)), timeout=30)
                assert err.value.code() == Code.NOT_FOUND
            as_bytes = pb.Image(encoded=probe.encode())
            request = pb.DetectChangeRequest(before=as_bytes, after=as_bytes)
            call(detect, request, pb.DetectChangeResponse, Code.INVALID_ARGUMENT)
            request = pb.DetectChangeRequest(before=image, after=image, request_id=probe)
            assert call(detect, request, pb.DetectChangeResponse, Code.OK).request_id == probe
            get = pb.GetModelRequest(name=probe)
            call(f"/{SERVICE_NAME}/GetModel", get, pb.ModelInfo, Code.NOT_FOUND)
            listing = call(
                f"/{SERVICE_NAME}/ListModels",
                unknown,
                pb.ListModelsResponse,
                Code.OK,
            )
            assert [m.name for m in listing.models] == ["synthetic-thin"]
            for field in ("model_name", "model_version"):
                request = _patch_pair(1)
                setattr(request, field, probe)
                if field == "model_version":
                    request.model_name = ""
                call(infer, request, kpb.ModelInferResponse, Code.NOT_FOUND)
            for damage in ("input name", "shared memory", "output name"):
                request = _patch_pair(1)
                if damage == "input name":
                    request.inputs[0].name = probe
                elif damage == "shared memory":  # Triton's extension, which this server lacks
                    tensor = request.inputs[1]
                    tensor.parameters["shared_memory_region"].string_param = probe
                    tensor.parameters["shared_memory_byte_size"].int64_param = 3072
                    del request.raw_input_contents[:]
                    request.inputs[0].contents.uint_contents.extend([0] * 3072)
                else:
                    request.outputs.add(name=probe)
                call(infer, request, kpb.ModelInferResponse, Code.INVALID_ARGUMENT)
            meta = kpb.ModelMetadataRequest(name=probe)
            call(
                f"/{kserve.SERVICE_NAME}/ModelMetadata",
                meta,
                kpb.ModelMetadataResponse,
                Code.NOT_FOUND,
            )
            ready = kpb.ModelReadyRequest(name=probe)
            reply = call(
                f"/{kserve.SERVICE_NAME}/ModelReady", ready, kpb.ModelReadyResponse, Code.OK
            )
            assert not reply.ready
            # the calls without a name field: the probe rides along as an unknown field
            for name in ("ServerMetadata", "ServerLive", "ServerReady"):
                reply = getattr(kpb, name + "Response")
                call(f"/{kserve.SERVICE_NAME}/{name}", unknown, reply, Code.OK)
            check = health_pb2.HealthCheckRequest(service=probe)
            call(
                "/grpc.health.v1.Health/Check",
                check,
                health_pb2.HealthCheckResponse,
                Code.NOT_FOUND,
            )
            # reflection looks files up by name, in its descriptor pool only
            calls += 1
            lookups = [
                reflection_pb2.ServerReflectionRequest(file_by_filename=probe),
                reflection_pb2.ServerReflectionRequest(file_containing_symbol=probe),
            ]
            answers = list(reflect(iter(lookups), timeout=30))
            assert [a.error_response.error_code for a in answers] == [5, 5]  # NOT_FOUND
    return calls


def _warm_up(address: str) -> None:
    """Every call kind once with harmless names, so that lazy imports happen before the probes."""
    _probe_every_field(address, ["no-such-model"])


_STRACE_LINE = re.compile(r"^(\d+)\s+(\d+\.\d+)\s+(\w+)\((.*)$")
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')


def _strace() -> str | None:
    """strace, if installed and allowed to trace here (containers may forbid ptrace)."""
    exe = shutil.which("strace")
    if exe is None:
        return None
    trial = [exe, "-f", "-qq", "-e", "trace=%file", "-o", os.devnull, "true"]
    return exe if subprocess.run(trial, capture_output=True, check=False).returncode == 0 else None


def _traced_server(strace_pid: int, log: Path) -> int | None:
    """The pid of the server strace started: its child, or the first pid in strace's log."""
    try:
        children = Path(f"/proc/{strace_pid}/task/{strace_pid}/children").read_text().split()
    except OSError:
        children = []
    if children:
        return int(children[0])
    try:
        with log.open() as lines:
            return int(next(lines).split()[0])
    except (OSError, StopIteration, ValueError):
        return None


def test_no_request_makes_the_server_touch_a_file(sandbox: Sandbox, tmp_path: Path) -> None:
    """The kernel's view: `rarechange serve`, as deployed, runs under strace, which logs every
    system call that takes a path (open, stat, access, readlink, exec, ...). From the first probe
    to the last answer, no call may name anything outside the models folder."""
    strace = _strace()
    if strace is None:
        pytest.skip("strace is not installed, or may not trace processes here")
    log = tmp_path / "strace.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RARECHANGE_")}
    env |= {
        "RARECHANGE_MODELS_DIR": str(sandbox.models),
        "RARECHANGE_HOST": "127.0.0.1",
        "RARECHANGE_PORT": "0",
        "RARECHANGE_METRICS_PORT": "-1",
        "RARECHANGE_GRACE_S": "0",
    }
    command = [strace, "-f", "-qq", "-ttt", "-s", "4096", "-e", "trace=%file", "-o", str(log)]
    command += [sys.executable, "-m", "serving.cli.main", "serve"]
    with (tmp_path / "server.err").open("w+") as err:
        proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT, env=env
        )
        try:
            ready, _, _ = select.select([proc.stdout], [], [], 120)
            line = proc.stdout.readline() if ready else ""
            if "serving on" not in line:
                err.seek(0)
                pytest.fail(f"the server did not start: {line}{err.read()}")
            address = line.split()[-1]
            _warm_up(address)
            start = time.time()
            calls = _probe_every_field(address, path_probes(sandbox))
            end = time.time()
        finally:
            server_pid = _traced_server(proc.pid, log)
            if server_pid is not None:  # a clean stop (SIGTERM); strace exits with it
                os.kill(server_pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                if server_pid is not None:
                    os.kill(server_pid, signal.SIGKILL)
                proc.kill()
                proc.wait()
            proc.stdout.close()
    models = str(sandbox.models)
    touched, seen_models = [], False
    for line in log.read_text(errors="replace").splitlines():
        match = _STRACE_LINE.match(line)
        if match is None:
            continue
        paths = _QUOTED.findall(match.group(4))
        seen_models |= any(p.startswith(models) for p in paths)
        if start <= float(match.group(2)) <= end and not all(p.startswith(models) for p in paths):
            touched.append(line)
    assert seen_models, "strace saw the server load its model: the trace covers the server"
    assert calls == CALLS_PER_PROBE * len(path_probes(sandbox))
    assert not touched, "\n".join(touched[:20])


_WATCHED_EVENTS = (
    *("open", "os.listdir", "os.scandir", "os.chdir", "glob.glob", "pathlib.Path.glob"),
    *("shutil.", "os.remove", "os.rename", "os.mkdir", "os.symlink", "os.link", "os.truncate"),
    *("socket.connect", "socket.getaddrinfo", "urllib.Request", "subprocess.Popen", "os.system"),
    *("os.exec", "os.posix_spawn", "os.spawn", "ctypes.dlopen", "sqlite3.connect"),
)
_audited: list[tuple[str, tuple]] | None = None


def _audit_hook(event: str, args: tuple) -> None:
    if _audited is not None and event.startswith(_WATCHED_EVENTS):
        _audited.append((event, args))


_audit_hook_added = False


def test_no_request_opens_a_file_or_a_socket_in_python(start_server, sandbox: Sandbox) -> None:
    """The same probes against a server in this process, seen by a Python audit hook (PEP 578):
    no open(), directory listing, socket connection, DNS lookup or process start while they run.
    Weaker than strace (C libraries bypass it) but it runs wherever the tests run."""
    global _audited, _audit_hook_added
    if not _audit_hook_added:  # hooks cannot be removed: one, idle unless recording
        sys.addaudithook(_audit_hook)
        _audit_hook_added = True
    server = start_server(models_dir=sandbox.models)
    _warm_up(server.address)
    _audited = []
    try:
        with open(os.devnull, "rb"):  # the hook is live: it sees this open
            pass
        assert [event for event, _ in _audited] == ["open"]
        _audited.clear()
        calls = _probe_every_field(server.address, path_probes(sandbox))
        events = list(_audited)
    finally:
        _audited = None
    assert calls == CALLS_PER_PROBE * len(path_probes(sandbox))
    assert events == [], events[:20]
