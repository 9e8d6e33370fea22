"""The Serve names of a test application's parts."""

from ray import serve

from backend.settings import deployment_name


def model_deployment(app: str) -> str:
    """The Textbot deployment of an application that serves one model."""
    [name] = [name for name in serve.status().applications[app].deployments if name.startswith(deployment_name(""))]
    return name


def model_handle(app: str):
    """A handle to the one model of application `app` (for its `stats`, say)."""
    return serve.get_deployment_handle(model_deployment(app), app_name=app)
