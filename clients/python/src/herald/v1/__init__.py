"""Generated protobuf messages of proto/herald/v1 (tools/gen_proto.py)."""
