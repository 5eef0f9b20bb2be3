# Type stub for the gRPC module generated from identity/proto/ca.proto.
# Written by underpass.protogen (make proto). DO NOT EDIT.
import typing

import grpc

from identity.proto import ca_pb2 as _identity_dot_proto_dot_ca_pb2


class IstioCertificateServiceStub:
    def __init__(self, channel: grpc.Channel) -> None: ...
    CreateCertificate: grpc.UnaryUnaryMultiCallable[_identity_dot_proto_dot_ca_pb2.IstioCertificateRequest, _identity_dot_proto_dot_ca_pb2.IstioCertificateResponse]


class IstioCertificateServiceServicer:
    def CreateCertificate(self, request: _identity_dot_proto_dot_ca_pb2.IstioCertificateRequest, context: grpc.ServicerContext) -> _identity_dot_proto_dot_ca_pb2.IstioCertificateResponse: ...


def add_IstioCertificateServiceServicer_to_server(
    servicer: IstioCertificateServiceServicer, server: grpc.Server
) -> None: ...
