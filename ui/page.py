"""The chat page itself: a Gradio ChatInterface with the sampling controls, history kept
in the browser, editable messages, like and dislike on replies."""

import os

import gradio as gr

from ui.chat import make_feedback_fn
from ui.hardening import refuse_code_editing
from ui.history import history_secret, keep_history
from ui.settings import ChatPageSettings

# Passed to mount_gradio_app / launch: Gradio 6 takes the look at hosting time.
LOOK = {
    "theme": gr.themes.Soft(primary_hue="indigo", neutral_hue="slate"),
    "css": "footer {visibility: hidden} .gradio-container {max-width: 960px !important; margin: auto}",
}


def login() -> tuple[str, str] | None:
    """Gradio's login, on when TEXTBOT_UI_USER and TEXTBOT_UI_PASSWORD are both set."""
    user, password = os.environ.get("TEXTBOT_UI_USER"), os.environ.get("TEXTBOT_UI_PASSWORD")
    return (user, password) if user and password else None


def build_page(chat_fn, settings: ChatPageSettings, record_feedback, storage_key: str) -> gr.Blocks:
    """`record_feedback(value, request_id)` counts a like or dislike; `storage_key` names the
    browser's saved conversations (one per page on an origin)."""
    refuse_code_editing()
    defaults = settings.generation
    chatbot = gr.Chatbot(label=settings.title, placeholder="Ask anything. Replies stream in as they are written.",
                         height="65vh", buttons=["copy"], feedback_options=("Like", "Dislike"))
    page = gr.ChatInterface(
        chat_fn,
        chatbot=chatbot,
        textbox=gr.Textbox(placeholder="Type a message and press Enter", submit_btn=True, stop_btn=True,
                           show_label=False, max_lines=12),
        additional_inputs=[
            gr.Textbox(defaults.system_prompt or "", label="System prompt", lines=2,
                       placeholder="Optional instructions for the assistant"),
            gr.Slider(0.0, 2.0, value=defaults.temperature, step=0.05, label="Temperature",
                      info="0 always picks the likeliest token"),
            gr.Slider(0.05, 1.0, value=defaults.top_p, step=0.05, label="Top-p"),
            gr.Slider(16, 2048, value=defaults.max_new_tokens, step=16, label="Max new tokens"),
        ],
        additional_inputs_accordion=gr.Accordion("Settings", open=False),
        examples=[[example] for example in settings.examples],
        run_examples_on_click=True,
        cache_examples=False,
        title=settings.title,
        description=settings.description,
        api_name="chat",
        concurrency_limit=settings.concurrency_limit,
        autofocus=True,
        editable=True,
        save_history=True,
        # Likes go to Prometheus and the request log (record_feedback), not Gradio's CSV file.
        flagging_mode="never",
        analytics_enabled=False,
    )
    keep_history(page, storage_key, history_secret(settings.history_secret_file))
    with page:
        chatbot.like(make_feedback_fn(record_feedback), [chatbot], None, queue=False,
                     api_visibility="undocumented")
    # Gradio's default is one event at a time for everyone; replies stream concurrently.
    page.queue(default_concurrency_limit=settings.concurrency_limit)
    return page
