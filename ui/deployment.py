"""The chat page as a Serve deployment, streaming from Textbot through a handle.

Ray's GradioServer does not work with gradio 6, so this is a plain ingress
deployment whose ASGI app is Gradio mounted on FastAPI. It lives in its own
Serve application (Ray allows one ASGI ingress per application) and must run
one replica: Gradio keeps each session's queue state in process memory.
"""

import gradio as gr
from fastapi import FastAPI
from ray import serve
from ray.serve import Application

from ui.chat import make_chat_fn
from ui.page import LOOK, build_page, login
from ui.settings import ChatPageSettings
from ui.sources import handle_source


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
@serve.ingress()
class ChatPage:
    def __init__(self, settings: ChatPageSettings):
        textbot = serve.get_deployment_handle("Textbot", app_name=settings.textbot_app)
        self.page = build_page(make_chat_fn(handle_source(textbot)), settings)

    def __serve_build_asgi_app__(self) -> FastAPI:
        # mount_gradio_app builds the page's config and starts its queue in the app's lifespan.
        return gr.mount_gradio_app(FastAPI(), self.page, path="/", auth=login(), **LOOK)


def build_app(settings: ChatPageSettings) -> Application:
    return ChatPage.bind(settings)
