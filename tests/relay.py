"""A second deployment that streams from Textbot through a DeploymentHandle,
the way the chat page does, and relays the pieces as NDJSON so a test can see
each piece the handle gave it."""

import json

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

relay_api = FastAPI()


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(relay_api)
class Relay:
    def __init__(self, textbot_app: str):
        self.textbot: DeploymentHandle = serve.get_deployment_handle("Textbot", app_name=textbot_app)

    @relay_api.post("/")
    async def relay(self, request: Request) -> StreamingResponse:
        body = await request.json()

        async def pieces():
            stream = self.textbot.options(stream=True).stream_chat.remote(
                body["messages"], body.get("sampling")
            )
            try:
                async for piece in stream:
                    yield json.dumps({"piece": piece}) + "\n"
            except Exception as exc:
                yield json.dumps({"error": str(exc)}) + "\n"

        return StreamingResponse(pieces(), media_type="application/x-ndjson")


def build(args: dict):
    return Relay.bind(args["textbot_app"])
