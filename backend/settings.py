"""One typed settings object for the Textbot application, filled from the
`args:` of its application in deploy.yaml.

Serve validates the args against `TextbotSettings` before it builds the
application (the builder's parameter is annotated with it), so a typo in
deploy.yaml fails `serve run` with pydantic's message naming the field.
"""

from __future__ import annotations

from pydantic import Field, model_validator

# The engine's own settings (the model it loads, how much it runs at once), defined in the engine;
# the application's hold them per model.
from backend.engine.settings import EngineSettings, ModelSettings, StrictSettings  # noqa: F401


class GenerationDefaults(StrictSettings):
    """Used for any parameter a request leaves out."""

    max_new_tokens: int = Field(256, ge=1)
    temperature: float = Field(0.7, ge=0.0, le=2.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    system_prompt: str | None = Field(
        None, description="Prepended as a system message when a conversation has none."
    )


class DeploymentOptions(StrictSettings):
    """A model's Serve deployment: its replicas, scaling and limits (Serve's own deployment options,
    passed to `Textbot.options`). Serve's `deployments:` section in the config can still override
    them by the deployment's name (`deployment_name`)."""

    num_replicas: int | None = Field(None, ge=0, description="A fixed number of replicas; or autoscaling_config.")
    autoscaling_config: dict | None = Field(
        None, description="Serve's autoscaling: min_replicas, max_replicas, initial_replicas, "
        "target_ongoing_requests, upscale_delay_s, downscale_delay_s... min_replicas: 0 lets the model sleep "
        "with no replica (and no memory) until a request comes; its first request waits for one to start.")
    max_ongoing_requests: int = Field(64, ge=1, description="Requests a replica takes at once; the engine's "
                                      "own limits (engine.max_running and max_waiting) decide what it refuses.")
    max_queued_requests: int = Field(64, ge=-1, description="Serve's queue in front of busy replicas (and of "
                                     "a model waking up); past it the API answers 503 with Retry-After.")
    ray_actor_options: dict = Field({"num_cpus": 1}, description="CPUs (torch's threads) and resources per replica.")
    request_router_config: dict = Field(
        {"request_router_class": "ray.serve.experimental.consistent_hash_router.ConsistentHashRouter"},
        description="How a request picks a replica: by default its conversation's key, hashed, so a "
        "conversation's turns meet its prefix cache.")
    health_check_period_s: float | None = Field(None, gt=0)
    graceful_shutdown_timeout_s: float | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _one_way_to_scale(self):
        if self.num_replicas is not None and self.autoscaling_config is not None:
            raise ValueError("give a model num_replicas or autoscaling_config, not both")
        return self

    def serve_options(self) -> dict:
        return self.model_dump(exclude_none=True)


class ServedModel(ModelSettings):
    """One model the application serves: where it comes from and how it runs (ModelSettings), with
    its engine limits and its deployment. Each is a Textbot deployment of its own."""

    engine: EngineSettings = EngineSettings()
    generation: GenerationDefaults | None = Field(
        None, description="This model's defaults for what a request leaves out; the application's otherwise.")
    deployment: DeploymentOptions = DeploymentOptions()

    @property
    def sleeps(self) -> bool:
        """No replica until a request asks for the model (Serve's autoscaling from zero)."""
        scaling = self.deployment.autoscaling_config
        if scaling is not None:
            return scaling.get("min_replicas", 1) == 0 and scaling.get("initial_replicas", 0) in (0, None)
        return self.deployment.num_replicas == 0

    def model_settings(self) -> ModelSettings:
        """What the engine loads: this entry without the serving options."""
        return ModelSettings.model_validate(self.model_dump(include=set(ModelSettings.model_fields)))


def deployment_name(model_name: str) -> str:
    """The Serve deployment that runs a model: `Textbot:<name>`, as Ray Serve LLM names its LLMServers."""
    return f"Textbot:{model_name}"


class ReplicaSettings(StrictSettings):
    """What one Textbot replica runs: one model, its engine and the defaults it fills in."""

    model: ModelSettings = ModelSettings()
    generation: GenerationDefaults = GenerationDefaults()
    engine: EngineSettings = EngineSettings()
    max_prompt_chars: int = Field(32_000, ge=1)


class TextbotSettings(StrictSettings):
    """The application's args: the models it serves, and what applies to all of them."""

    @model_validator(mode="before")
    @classmethod
    def _one_model(cls, values):
        # `model:` (and `engine:`) as before several models: a list of one.
        if isinstance(values, dict) and "model" in values:
            if "models" in values:
                raise ValueError("give either model (one model) or models (a list), not both")
            values = dict(values)
            model = values.pop("model")
            if not isinstance(model, dict):
                raise ValueError("model must be a mapping (source, name, quantization, ...)")
            engine = values.pop("engine", None)
            values["models"] = [model | ({"engine": engine} if engine is not None else {})]
        elif isinstance(values, dict) and "engine" in values:
            raise ValueError("engine: goes inside each entry of models (each model has its own engine limits)")
        return values

    models: list[ServedModel] = Field([ServedModel()], min_length=1, description=(
        "The models served, each by name (its `name`, else its file's). The first is the default: requests "
        "that name no model get it, and the chat page opens on it."))
    generation: GenerationDefaults = GenerationDefaults()
    max_prompt_chars: int = Field(
        32_000, ge=1, description="Longest prompt or message accepted, in characters."
    )

    @model_validator(mode="after")
    def _names_once(self):
        names = [model.served_name for model in self.models]
        if twice := sorted({name for name in names if names.count(name) > 1}):
            raise ValueError(f"two models are named {twice[0]!r}: give each its own name (models[].name)")
        return self

    @property
    def default(self) -> ServedModel:
        return self.models[0]

    def served(self, name: str) -> ServedModel:
        return next(model for model in self.models if model.served_name == name)

    def replica(self, model: ServedModel) -> ReplicaSettings:
        """What a replica of `model` runs."""
        return ReplicaSettings(model=model.model_settings(), engine=model.engine,
                               generation=model.generation or self.generation, max_prompt_chars=self.max_prompt_chars)
