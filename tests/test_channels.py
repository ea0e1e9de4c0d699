"""Client channels spread calls over every address a target resolves to (round_robin)."""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.common.channels import make_channel


class CountingHealth(health.aio.HealthServicer):
    def __init__(self):
        super().__init__()
        self.calls = 0

    async def Check(self, request, context):
        self.calls += 1
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


def test_a_target_with_several_pods_gets_calls_on_each():
    async def scenario():
        servers, servicers, ports = [], [], []
        for _ in range(2):
            server, servicer = grpc.aio.server(), CountingHealth()
            health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
            ports.append(server.add_insecure_port("127.0.0.1:0"))
            await server.start()
            servers.append(server)
            servicers.append(servicer)
        try:
            # What a headless Service's DNS name gives a gateway: several addresses behind one target.
            channel = make_channel(f"ipv4:127.0.0.1:{ports[0]},127.0.0.1:{ports[1]}")
            stub = health_pb2_grpc.HealthStub(channel)
            for _ in range(20):
                await stub.Check(health_pb2.HealthCheckRequest(), wait_for_ready=True, timeout=10)
            await channel.close()
        finally:
            for server in servers:
                await server.stop(0)
        return [s.calls for s in servicers]

    calls = asyncio.run(scenario())
    assert sum(calls) == 20 and min(calls) >= 5, calls
