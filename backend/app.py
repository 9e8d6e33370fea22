"""Application builder named by deploy.yaml (`import_path: backend.app:build_app`).

Two deployments composed through a handle, as Ray Serve LLM does it: TextbotAPI,
the HTTP ingress, and Textbot, the model's replicas. Each scales on its own.

No `from __future__ import annotations` here: Serve reads the parameter's
annotation to validate deploy.yaml's `args` into `TextbotSettings`.
"""

from ray.serve import Application

from backend.engine import location
from backend.api import TextbotAPI
from backend.settings import TextbotSettings
from backend.textbot import Textbot


def build_app(settings: TextbotSettings) -> Application:
    # Resolve the model here, where a wrong source fails `serve run` once with a
    # clear message, instead of in every replica's constructor, over and over.
    location.locate(settings.model)
    return TextbotAPI.bind(settings, Textbot.bind(settings))
