"""The gateway's own routes (gateway/admin.py), in-process: /v1/models, /health, /openapi.json."""

from __future__ import annotations

import pytest

from gateway.settings import GatewaySettings
from tests.gateway.inproc import GatewayUnderTest, InProcessCluster, refusing_port, running_gateway

pytestmark = pytest.mark.anyio


async def test_models_lists_every_name_and_alias(gateway: GatewayUnderTest) -> None:
    names = {model.id async for model in gateway.client().models.list()}
    assert names == {"echo", "echo-alias", "other"}


async def test_health_shows_the_routing_table(
    gateway: GatewayUnderTest, cluster: InProcessCluster
) -> None:
    health = (await gateway.http.get("/health")).json()
    version = (await cluster.table()).version
    assert health["routing_table_version"] == version
    assert health["models"] == ["echo", "echo-alias", "other"]
    ready = await gateway.http.get("/ready")  # a readiness probe: routes requests
    assert ready.status_code == 200 and ready.json()["routing_table_version"] == version
    # and a gateway that never reached its controller says it has no table: alive, not ready
    with refusing_port() as port:
        unreachable = GatewaySettings(controller_url=f"http://127.0.0.1:{port}")
        async with running_gateway(unreachable) as lonely:
            assert await lonely.routing_table_version() is None
            assert (await lonely.http.get("/health")).status_code == 200
            not_ready = await lonely.http.get("/ready")
            assert not_ready.status_code == 503 and not_ready.json()["ready"] is False


async def test_openapi_schema_describes_the_openai_routes(gateway: GatewayUnderTest) -> None:
    schema = (await gateway.http.get("/openapi.json")).json()
    chat = schema["paths"]["/v1/chat/completions"]["post"]
    assert {"200", "400", "401", "404", "429", "502", "503"} <= set(chat["responses"])
    body = schema["components"]["schemas"]["ChatCompletionRequest"]
    assert set(body["required"]) == {"model", "messages"}
    assert "prompt" in schema["components"]["schemas"]["CompletionRequest"]["required"]
    assert "/v1/models" in schema["paths"] and "/health" in schema["paths"]
    error = schema["components"]["schemas"]["ErrorDetail"]
    assert set(error["properties"]) == {"message", "type", "param", "code"}
    assert (await gateway.http.get("/docs")).status_code == 200
