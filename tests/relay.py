"""A second deployment that streams from Textbot through a DeploymentHandle, the way
a program inside Serve would (Textbot.stream_reply, with plain dicts), and relays the text
pieces as NDJSON so a test can see each piece the handle gave it."""

import json

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from ray import serve

from backend.routing import ServedModels

relay_api = FastAPI()


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(relay_api)
class Relay:
    def __init__(self, textbot_app: str):
        self.models = ServedModels(textbot_app)

    @relay_api.post("/")
    async def relay(self, request: Request) -> StreamingResponse:
        body = await request.json()
        handle = (await self.models.get()).handle(None)  # the application's default model

        async def pieces():
            stream = handle.options(stream=True).stream_reply.remote(body["messages"], body.get("sampling"))
            try:
                async for piece in stream:
                    if piece.text:
                        yield json.dumps({"piece": piece.text}) + "\n"
            except Exception as exc:
                yield json.dumps({"error": str(exc)}) + "\n"

        return StreamingResponse(pieces(), media_type="application/x-ndjson")


def build(args: dict):
    return Relay.bind(args["textbot_app"])
