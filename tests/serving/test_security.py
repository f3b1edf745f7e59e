"""TLS, mutual TLS and the bearer token against a real server, with certificates made here."""

from __future__ import annotations

import datetime
import ipaddress
import json
import socket
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from click.testing import CliRunner
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import ValidationError

from serving.api import change_detection_pb2 as pb
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
