"""The committed generated code must be exactly what grpcio-tools makes from helix.proto."""

from __future__ import annotations

import os

from protos import generate


def test_generated_code_matches_proto(tmp_path):
    written = generate.generate(str(tmp_path))
    stale = []
    for path in written:
        name = os.path.basename(path)
        with (
            open(path, encoding="utf-8") as fresh,
            open(os.path.join(generate.HERE, name), encoding="utf-8") as committed,
        ):
            if fresh.read() != committed.read():
                stale.append(name)
    assert not stale, f"protos/{', '.join(stale)} out of date with helix.proto: run `python -m protos.generate`"


def test_package_import_and_services():
    from protos import helix_pb2, helix_pb2_grpc

    services = helix_pb2.DESCRIPTOR.services_by_name
    assert helix_pb2.DESCRIPTOR.package == "helix.v1"
    assert set(services["Agent"].methods_by_name) >= {"Heartbeat", "GetMetrics"}
    assert set(services["Registry"].methods_by_name) == {"Register", "Deregister"}
    assert hasattr(helix_pb2_grpc, "AgentStub") and hasattr(helix_pb2_grpc, "RegistryServicer")
    req = helix_pb2.RegisterRequest(instance_id="i-1", address="127.0.0.1:1", vcpus=2, labels={"zone": "a"})
    assert helix_pb2.RegisterRequest.FromString(req.SerializeToString()) == req
