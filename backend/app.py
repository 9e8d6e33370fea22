"""Application builder named by deploy.yaml (`import_path: backend.app:build_app`).

One Textbot deployment per model (`Textbot:<name>`), each with its own replicas, scaling and
health, behind one HTTP ingress, TextbotAPI, that routes on the request's model: as Ray
Serve LLM's `build_openai_app` does it.

No `from __future__ import annotations` here: Serve reads the parameter's
annotation to validate deploy.yaml's `args` into `TextbotSettings`.
"""

from ray.serve import Application

from backend.api import TextbotAPI
from backend.engine import location
from backend.settings import TextbotSettings, deployment_name
from backend.textbot import Textbot


def build_app(settings: TextbotSettings) -> Application:
    models = []
    for model in settings.models:
        # Resolve each model here, where a wrong source fails `serve run` once with a clear
        # message, instead of in every replica's constructor, over and over.
        location.locate(model.model_settings())
        deployment = Textbot.options(name=deployment_name(model.served_name), **model.deployment.serve_options())
        models.append(deployment.bind(settings.replica(model)))
    return TextbotAPI.bind(settings, models)
