"""The committed generated protobuf code matches the .proto files."""

from proto.generate import proto_files, stale_files


def test_generated_code_is_fresh() -> None:
    assert proto_files(), "no .proto files found"
    assert stale_files() == []
