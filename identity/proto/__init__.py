"""Generated protobuf modules (see underpass.protogen)."""
