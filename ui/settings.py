"""Settings of the chat page, from its application's `args` in deploy.yaml."""

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from backend.settings import GenerationDefaults


class ChatPageSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    textbot_app: str = Field("textbot", description="Serve application that serves the models (backend.app).")
    title: str = "Textbot"
    description: str = "A small language model, streamed token by token from Ray Serve."
    generation: GenerationDefaults = GenerationDefaults()
    concurrency_limit: int = Field(
        16, ge=1, description="Replies streaming at once across all users; more wait in Gradio's queue."
    )
    history_secret_file: Path | None = Field(
        None, description="File holding the secret that encrypts conversations kept in the browser; made on "
        "first use. Default ~/.config/textbot/chat-history-secret; TEXTBOT_UI_SECRET overrides it.")
    examples: list[str] = [
        "Tell me a short story about a fox who learns to sail.",
        "Explain what a language model is to a ten-year-old.",
        "Write a haiku about the sea.",
    ]
