"""deploy/docker/bin: the scripts the images carry, run as the images and the manifests run them,
against the real server (plaintext, and TLS with certificates made here)."""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, LiveServer

from serving.server import SERVICE_NAME

BIN = ROOT / "deploy" / "docker" / "bin"
TIMEOUT_S = 120


def script(name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("RARECHANGE_")}
    return subprocess.run(
        [sys.executable, str(BIN / name), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**base, "PYTHONPATH": str(ROOT), **(env or {})},
        timeout=TIMEOUT_S,
    )


# ----------------------------------------------------------------------------- healthcheck
def test_healthcheck_says_serving_for_the_server_and_the_service(live_server: LiveServer) -> None:
    for service in ("", SERVICE_NAME):
        done = script("healthcheck.py", "--address", live_server.address, "--service", service)
        assert done.returncode == 0, done.stderr
        assert "SERVING" in done.stdout
    # the image's HEALTHCHECK passes no flags: the port comes from RARECHANGE_PORT
    port = live_server.address.rpartition(":")[2]
    done = script("healthcheck.py", env={"RARECHANGE_PORT": port})
    assert done.returncode == 0, done.stderr


def test_healthcheck_fails_for_an_unknown_service_and_a_closed_port(
    live_server: LiveServer,
) -> None:
    done = script("healthcheck.py", "--address", live_server.address, "--service", "no.Such")
    assert done.returncode == 1 and "NOT_FOUND" in done.stderr
    done = script("healthcheck.py", "--address", "127.0.0.1:1", "--timeout-s", "2")
    assert done.returncode == 1 and "UNAVAILABLE" in done.stderr


def test_healthcheck_over_tls(start_server, tmp_path: Path) -> None:
    """The exec probe for a server with TLS on (the kubelet's gRPC probe is plaintext only)."""
    pytest.importorskip("cryptography")
    ca, cert, key = make_certificates(tmp_path)
    models = tmp_path / "models"
    models.mkdir()
    shutil.copytree(ROOT / "models" / "synthetic-thin", models / "synthetic-thin")
    server = start_server(models, tls_cert=cert, tls_key=key, warmup=False, metrics_port=-1)
    done = script("healthcheck.py", "--address", server.address, "--tls-ca", str(ca))
    assert done.returncode == 0, done.stderr
    # plaintext against a TLS server: refused
    done = script("healthcheck.py", "--address", server.address, "--timeout-s", "2")
    assert done.returncode == 1


def make_certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it: (ca.pem, server.pem, key.pem)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("test CA"))
        .issuer_name(name("test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name("127.0.0.1"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = folder / "ca.pem", folder / "server.pem", folder / "server-key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


# ----------------------------------------------------------------------------- Triton
def test_wait_for_triton_speaks_the_open_inference_protocol(live_server: LiveServer) -> None:
    """`rarechange serve` answers the same KServe v2 ServerReady/ModelReady as Triton, for the
    same models: the init container's check, against a real server."""
    done = script(
        "wait_for_triton.py",
        "--url",
        live_server.address,
        "--models-dir",
        str(ROOT / "models"),
        "--timeout-s",
        "60",
    )
    assert done.returncode == 0, done.stderr
    bundled = len(list((ROOT / "models").glob("*/model.onnx")))
    assert f"ready with {bundled} model(s)" in done.stdout


def test_wait_for_triton_gives_up_in_time() -> None:
    done = script("wait_for_triton.py", "--url", "127.0.0.1:1", "--timeout-s", "1")
    assert done.returncode == 1 and "not ready after 1 s" in done.stderr


def test_triton_repo_refuses_what_it_cannot_write(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    done = script("triton_repo.py", "--models-dir", str(empty), "--out", str(tmp_path / "r"))
    assert done.returncode == 1 and "no NAME/model.onnx" in done.stderr
    done = script("triton_repo.py", "--model", "nope", "--out", str(tmp_path / "r"))
    assert done.returncode == 1 and "no such model" in done.stderr
    done = script("triton_repo.py", "--kind", "KIND_CPU", "--tensorrt-fp16", "--out", str(tmp_path))
    assert done.returncode == 1 and "GPU instances" in done.stderr
