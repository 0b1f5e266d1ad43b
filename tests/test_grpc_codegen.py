"""The committed gRPC stubs match proto/fermi.proto, and the proto keeps the original wire
fields. Regenerate with `python -m fermi.grpc_server.codegen` when this fails."""

from __future__ import annotations

import re

import pytest
from google.protobuf import descriptor_pb2

from fermi.grpc_server import codegen
from fermi.grpc_server import fermi_pb2 as pb

pytest.importorskip("grpc_tools")

STALE = "stale stubs: run `python -m fermi.grpc_server.codegen` and commit the result"


def test_committed_descriptor_matches_the_proto(tmp_path):
    compiled = descriptor_pb2.FileDescriptorSet.FromString(
        codegen.descriptor_set(tmp_path / "fermi.pb")
    )
    (fresh,) = compiled.file
    for message in fresh.message_type:  # python_out leaves out the derivable json names
        for field in message.field:
            field.ClearField("json_name")
    committed = descriptor_pb2.FileDescriptorProto.FromString(pb.DESCRIPTOR.serialized_pb)
    assert fresh == committed, STALE


def test_committed_files_equal_a_fresh_generation(tmp_path):
    generated = codegen.generate(tmp_path)
    committed_grpc = (codegen.PACKAGE_DIR / "fermi_pb2_grpc.py").read_text()
    fresh_grpc = (generated / "fermi_pb2_grpc.py").read_text()
    version = re.compile(r"GRPC_GENERATED_VERSION = '([^']+)'")
    if version.search(committed_grpc)[1] != version.search(fresh_grpc)[1]:
        pytest.skip("another grpcio-tools version; the descriptor test above still applies")
    for name in codegen.OUTPUTS:
        fresh = (generated / name).read_text()
        assert (codegen.PACKAGE_DIR / name).read_text() == fresh, f"{name}: {STALE}"


ORIGINAL_REQUEST = {
    "session_id": (1, "TYPE_STRING"),
    "prompt": (2, "TYPE_STRING"),
    "max_new_tokens": (3, "TYPE_UINT32"),
    "repeat_penalty": (4, "TYPE_FLOAT"),
    "system_prompt": (5, "TYPE_STRING"),
    "temperature": (6, "TYPE_FLOAT"),
    "top_p": (7, "TYPE_FLOAT"),
}
ORIGINAL_RESPONSE = {
    "token": (1, "TYPE_STRING"),
    "token_id": (2, "TYPE_UINT32"),
    "session_id": (3, "TYPE_STRING"),
}


@pytest.mark.parametrize(
    ("message", "original"),
    [("GenerateRequest", ORIGINAL_REQUEST), ("GenerateResponse", ORIGINAL_RESPONSE)],
)
def test_the_original_fields_keep_their_numbers_and_types(message, original):
    proto = descriptor_pb2.FileDescriptorProto.FromString(pb.DESCRIPTOR.serialized_pb)
    (msg,) = [m for m in proto.message_type if m.name == message]
    fields = {f.name: f for f in msg.field}
    for name, (number, kind) in original.items():
        field = fields[name]
        assert (
            field.number == number
            and descriptor_pb2.FieldDescriptorProto.Type.Name(field.type) == kind
        ), name
        assert field.label == field.LABEL_OPTIONAL and not field.proto3_optional, name
    assert proto.package == "fermi"
    (service,) = proto.service
    generate = next(m for m in service.method if m.name == "Generate")
    assert service.name == "Fermi" and generate.server_streaming and not generate.client_streaming
