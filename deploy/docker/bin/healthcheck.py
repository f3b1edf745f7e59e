"""Exit 0 when a rarechange server says SERVING on grpc.health.v1, 1 otherwise.

The images' HEALTHCHECK (``docker run``, compose). Kubernetes uses its native gRPC probes instead,
which speak plaintext only: with TLS on, run this as an exec probe with ``--tls-ca`` (and
``--tls-cert``/``--tls-key`` for mutual TLS). Health needs no bearer token.

    python /opt/rarechange/bin/healthcheck.py [--address HOST:PORT] [--service NAME]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def default_address() -> str:
    """127.0.0.1 on $RARECHANGE_PORT, else the server's own default port."""
    port = os.environ.get("RARECHANGE_PORT")
    if not port:
        from serving.config import ServerSettings

        port = str(ServerSettings.model_fields["port"].default)
    return f"127.0.0.1:{port}"


def channel(args: argparse.Namespace) -> grpc.Channel:
    if args.tls_ca is None:
        if args.tls_cert or args.tls_key:
            raise SystemExit("--tls-cert and --tls-key need --tls-ca")
        return grpc.insecure_channel(args.address)
    if (args.tls_cert is None) != (args.tls_key is None):
        raise SystemExit("--tls-cert and --tls-key go together")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=args.tls_ca.read_bytes(),
        private_key=args.tls_key.read_bytes() if args.tls_key else None,
        certificate_chain=args.tls_cert.read_bytes() if args.tls_cert else None,
    )
    options = [("grpc.ssl_target_name_override", args.server_name)] if args.server_name else []
    return grpc.secure_channel(args.address, credentials, options=options)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default=None, help="HOST:PORT [127.0.0.1:$RARECHANGE_PORT]")
    parser.add_argument(
        "--service", default="", help="Service name; '' (the default) is the whole server."
    )
    parser.add_argument("--timeout-s", type=float, default=3.0, help="Deadline of the check.")
    parser.add_argument("--tls-ca", type=Path, default=None, help="CA of the server certificate.")
    parser.add_argument("--tls-cert", type=Path, default=None, help="Client certificate (mTLS).")
    parser.add_argument("--tls-key", type=Path, default=None, help="Client private key (mTLS).")
    parser.add_argument(
        "--server-name", default=None, help="Name on the server certificate [the host]."
    )
    args = parser.parse_args(argv)
    args.address = args.address or default_address()
    request = health_pb2.HealthCheckRequest(service=args.service)
    try:
        with channel(args) as ch:
            response = health_pb2_grpc.HealthStub(ch).Check(request, timeout=args.timeout_s)
    except grpc.RpcError as exc:
        print(f"{args.address}: {exc.code().name} {exc.details() or ''}".rstrip(), file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    print(f"{args.address} {args.service or '(server)'}: {status}")
    return 0 if response.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
