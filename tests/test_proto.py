"""The committed stubs match proto/: regenerate and compare; and the check really detects drift."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("grpc_tools")


def _check(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(root / "proto" / "generate.py"), "--check"],
        capture_output=True,
        text=True,
        cwd=root,
        timeout=120,
    )


def test_generated_stubs_are_up_to_date() -> None:
    out = _check(ROOT)
    assert out.returncode == 0, out.stderr


def test_check_fails_on_a_changed_proto(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "proto", tmp_path / "proto")
    shutil.copytree(ROOT / "serving" / "api", tmp_path / "serving" / "api")
    proto = tmp_path / "proto" / "rarechange" / "v1" / "change_detection.proto"
    proto.write_text(
        proto.read_text().replace(
            "string request_id = 4;", "string request_id = 4;\n  string extra = 99;", 1
        )
    )
    out = _check(tmp_path)
    assert out.returncode == 1
    assert "make proto" in out.stderr


def test_proto_package_and_service() -> None:
    from serving.api import change_detection_pb2 as pb

    service = pb.DESCRIPTOR.services_by_name["ChangeDetection"]
    assert service.full_name == "rarechange.v1.ChangeDetection"
    assert {"DetectChange", "DetectChangeStream", "ListModels", "GetModel"} <= set(
        service.methods_by_name
    )


def test_check_covers_the_vendored_kserve_proto(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "proto", tmp_path / "proto")
    shutil.copytree(ROOT / "serving" / "api", tmp_path / "serving" / "api")
    proto = tmp_path / "proto" / "kserve" / "grpc_predict_v2.proto"
    proto.write_text(proto.read_text().replace("bool live = 1;", "bool live = 1;\n  bool x = 9;"))
    out = _check(tmp_path)
    assert out.returncode == 1
    assert "grpc_predict_v2_pb2.py" in out.stderr


def test_kserve_proto_keeps_its_licence_and_lives_in_a_private_pool() -> None:
    """Vendored verbatim (Apache-2.0 header kept); its `inference` package must not take the
    default pool, where tritonclient's grpc_service.proto defines the same names."""
    from google.protobuf import descriptor_pool

    from serving.api import grpc_predict_v2_pb2 as kpb

    text = (ROOT / "proto" / "kserve" / "grpc_predict_v2.proto").read_text()
    assert text.startswith("// Copyright 2020 kubeflow.org.") and "Apache License" in text
    service = kpb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert service.full_name == "inference.GRPCInferenceService"
    assert kpb.DESCRIPTOR.pool is kpb.POOL is not descriptor_pool.Default()
    with pytest.raises(KeyError):
        descriptor_pool.Default().FindFileByName(kpb.DESCRIPTOR.name)
