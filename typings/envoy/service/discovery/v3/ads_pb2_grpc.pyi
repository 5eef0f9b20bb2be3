# Type stub for the gRPC module generated from envoy/service/discovery/v3/ads.proto.
# Written by underpass.protogen (make proto). DO NOT EDIT.
import typing

import grpc

from envoy.service.discovery.v3 import discovery_pb2 as _envoy_dot_service_dot_discovery_dot_v3_dot_discovery_pb2


class AggregatedDiscoveryServiceStub:
    def __init__(self, channel: grpc.Channel) -> None: ...
    StreamAggregatedResources: grpc.StreamStreamMultiCallable[_envoy_dot_service_dot_discovery_dot_v3_dot_discovery_pb2.DiscoveryRequest, _envoy_dot_service_dot_discovery_dot_v3_dot_discovery_pb2.DiscoveryResponse]
    DeltaAggregatedResources: grpc.StreamStreamMultiCallable[_envoy_dot_service_dot_discovery_dot_v3_dot_discovery_pb2.DeltaDiscoveryRequest, _envoy_dot_service_dot_discovery_dot_v3_dot_discovery_pb2.DeltaDiscoveryResponse]


class AggregatedDiscoveryServiceServicer:
    def StreamAggregatedResources(self, request: typing.Iterator[_envoy_dot_service_dot_discovery_dot_v3_dot_discovery_pb2.DiscoveryRequest], context: grpc.ServicerContext) -> typing.Iterator[_envoy_dot_service_dot_discovery_dot_v3_dot_discovery_pb2.DiscoveryResponse]: ...
    def DeltaAggregatedResources(self, request: typing.Iterator[_envoy_dot_service_dot_discovery_dot_v3_dot_discovery_pb2.DeltaDiscoveryRequest], context: grpc.ServicerContext) -> typing.Iterator[_envoy_dot_service_dot_discovery_dot_v3_dot_discovery_pb2.DeltaDiscoveryResponse]: ...


def add_AggregatedDiscoveryServiceServicer_to_server(
    servicer: AggregatedDiscoveryServiceServicer, server: grpc.Server
) -> None: ...
