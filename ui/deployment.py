"""The chat page as a Serve deployment, streaming from Textbot through a handle.

Ray's GradioServer does not work with gradio 6, so this is a plain ingress
deployment whose ASGI app is Gradio mounted on FastAPI. It lives in its own
Serve application (Ray allows one ASGI ingress per application) and must run
one replica: Gradio keeps each session's queue state in process memory.
"""

import json
import logging

import gradio as gr
from fastapi import FastAPI
from ray import serve
from ray.serve import Application, metrics

from ui.hardening import HOSTING, app_kwargs
from ui.page import LOOK, build_page, login
from ui.settings import ChatPageSettings
from ui.sources import HandleBackend

# Serve's logger: the page replica's lines land next to the model replicas' request log.
request_log = logging.getLogger("ray.serve")


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
@serve.ingress()
class ChatPage:
    def __init__(self, settings: ChatPageSettings):
        # Exported with Ray's metrics as ray_textbot_feedback_total{value="like"|"dislike"},
        # tagged with the page's application, so each page's likes can be told apart.
        self.feedback = metrics.Counter("textbot_feedback", description="Likes and dislikes given to replies "
                                        "in the chat page, by value.", tag_keys=("value",))
        app = serve.get_replica_context().app_name
        # The models are asked of the Textbot application when a browser loads the page, not here:
        # its ingress may start after this replica.
        self.page = build_page(HandleBackend(settings.textbot_app), settings,
                               self.record_feedback, storage_key=f"textbot_conversations_{app}")

    def record_feedback(self, value: str, request_id: str | None) -> None:
        self.feedback.inc(tags={"value": value})
        # request_id: the reply's, as on the Textbot replica's log line for it.
        request_log.info(json.dumps({"event": "feedback", "value": value, "reply_request_id": request_id}))

    def __serve_build_asgi_app__(self) -> FastAPI:
        # mount_gradio_app builds the page's config and starts its queue in the app's lifespan.
        return gr.mount_gradio_app(FastAPI(), self.page, path="/", auth=login(), app_kwargs=app_kwargs(),
                                   **HOSTING, **LOOK)


def build_app(settings: ChatPageSettings) -> Application:
    return ChatPage.bind(settings)
