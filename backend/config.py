"""The one reader of deploy.yaml (a Serve config file): what `make run`, the compiled-step
builder, the standalone page, the benchmarks and the tests take from it.

Serve itself validates the whole file (ServeDeploySchema) and each application's args
(TextbotSettings for backend.app, ChatPageSettings for ui.deployment); this reads it the
same way for everyone else.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from backend.settings import TextbotSettings

DEPLOY_YAML = Path(__file__).resolve().parent.parent / "deploy.yaml"
TEXTBOT_IMPORT = "backend.app:build_app"
PAGE_IMPORT = "ui.deployment:build_app"


@dataclass
class DeployConfig:
    raw: dict  # as the file says it; launch.py hands it to Serve
    path: Path = DEPLOY_YAML

    @classmethod
    def read(cls, path: Path | str = DEPLOY_YAML) -> DeployConfig:
        path = Path(path)
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path} is not a Serve config: expected a mapping with `applications:`.")
        return cls(raw, path)

    @property
    def applications(self) -> list[dict]:
        return self.raw.get("applications") or []

    def app(self, name: str) -> dict:
        try:
            return next(app for app in self.applications if app.get("name") == name)
        except StopIteration:
            raise KeyError(f"{self.path} has no application named {name!r}") from None

    @property
    def http_port(self) -> int:
        return (self.raw.get("http_options") or {}).get("port", 8000)  # Serve's default

    def textbot(self, name: str | None = None) -> TextbotSettings:
        """The settings of the models application `name` (default: the first such)."""
        apps = [app for app in self.applications if app.get("import_path") == TEXTBOT_IMPORT
                and (name is None or app.get("name") == name)]
        if not apps:
            raise KeyError(f"{self.path} has no {TEXTBOT_IMPORT} application" + (f" named {name!r}" if name else ""))
        return TextbotSettings.model_validate(apps[0].get("args") or {})

    def textbot_apps(self) -> list[tuple[dict, TextbotSettings]]:
        """Every models application, with its validated settings."""
        return [(app, TextbotSettings.model_validate(app.get("args") or {}))
                for app in self.applications if app.get("import_path") == TEXTBOT_IMPORT]

    def page_args(self) -> dict:
        """The chat page application's args ({} when there is none)."""
        return next((app.get("args") or {} for app in self.applications if app.get("import_path") == PAGE_IMPORT), {})
