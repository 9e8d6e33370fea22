"""The chat page itself: a model picker over a Gradio ChatInterface with the sampling
controls, history kept in the browser, editable messages, like and dislike on replies."""

import html
import os

import gradio as gr

from ui.chat import Backend, conversation_model, make_chat_fn, make_feedback_fn, reason
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


def model_picker() -> gr.Dropdown:
    """Empty until the page loads: the models are asked of the backend then (fill_picker), since
    the page may start before the backend does. Custom values are allowed because a session
    that never loaded the page (an API client) has no choices to check against; the chat
    function refuses a model that is not served, naming the ones that are."""
    return gr.Dropdown(choices=[], value=None, label="Model", allow_custom_value=True, interactive=True,
                       scale=0, min_width=280)


def make_fill_picker(backend: Backend):
    """The page's load event: the served models, the default first and picked."""

    async def fill_picker():
        try:
            served = list(await backend.models())
        except Exception as error:  # the page still works: messages go to the default model
            gr.Warning(f"Could not list the served models ({reason(error)}); the default model answers.")
            return gr.Dropdown()
        return gr.Dropdown(choices=served, value=served[0])

    return fill_picker


def make_restore_model(backend: Backend):
    """A saved conversation opened from the history list: pick the model that wrote its last reply
    (the default for one saved before the page named models), or the default, with a notice, when
    that model is no longer served."""

    async def restore_model(index, conversations):
        if not isinstance(index, int) or not 0 <= index < len(conversations or []):
            return gr.Dropdown()
        try:
            served = list(await backend.models())
        except Exception:  # noqa: BLE001 - keep the picker as it is; sending says what is wrong
            return gr.Dropdown()
        recorded = conversation_model(conversations[index]) or served[0]
        if recorded not in served:
            gr.Warning(f"This conversation's model, {recorded}, is no longer served here: "
                       f"it continues with {served[0]}.")
            recorded = served[0]
        return gr.Dropdown(choices=served, value=recorded)

    return restore_model


def build_page(backend: Backend, settings: ChatPageSettings, record_feedback, storage_key: str) -> gr.Blocks:
    """`backend` serves the models; `record_feedback(value, request_id)` counts a like or dislike;
    `storage_key` names the browser's saved conversations (one per page on an origin)."""
    refuse_code_editing()
    with gr.Blocks(title=settings.title, analytics_enabled=False) as page:
        # The title and description above the picker, so the picker sits right over the chat
        # (ChatInterface would put its own header below anything rendered before it).
        gr.Markdown(f"<h1 style='text-align: center'>{html.escape(settings.title)}</h1>\n\n"
                    f"{settings.description or ''}")
        with gr.Row():
            picker = model_picker()
        chat = chat_interface(make_chat_fn(backend), settings, picker)
        keep_history(chat, storage_key, history_secret(settings.history_secret_file))
        chat.chatbot.like(make_feedback_fn(record_feedback), [chat.chatbot], None, queue=False,
                          api_visibility="undocumented")
        page.load(make_fill_picker(backend), None, [picker], api_visibility="undocumented")
        chat.chat_history_dataset.click(make_restore_model(backend), [chat.chat_history_dataset,
                                        chat.saved_conversations], [picker], api_visibility="undocumented")
    # Gradio's default is one event at a time for everyone; replies stream concurrently.
    page.queue(default_concurrency_limit=settings.concurrency_limit)
    return page


def chat_interface(chat_fn, settings: ChatPageSettings, picker: gr.Dropdown) -> gr.ChatInterface:
    """The chat itself; the picker is its last input, so the /chat API takes `model` last and
    callers that leave it out get the default model. Built inside the page's Blocks: its own
    parts are made unrendered (render=False), for ChatInterface to place them."""
    defaults = settings.generation
    chatbot = gr.Chatbot(label=settings.title, placeholder="Ask anything. Replies stream in as they are written.",
                         height="65vh", buttons=["copy"], feedback_options=("Like", "Dislike"), render=False)
    return gr.ChatInterface(
        chat_fn,
        chatbot=chatbot,
        textbox=gr.Textbox(placeholder="Type a message and press Enter", submit_btn=True, stop_btn=True,
                           show_label=False, max_lines=12, render=False),
        additional_inputs=[
            gr.Textbox(defaults.system_prompt or "", label="System prompt", lines=2,
                       placeholder="Optional instructions for the assistant", render=False),
            gr.Slider(0.0, 2.0, value=defaults.temperature, step=0.05, label="Temperature",
                      info="0 always picks the likeliest token", render=False),
            gr.Slider(0.05, 1.0, value=defaults.top_p, step=0.05, label="Top-p", render=False),
            gr.Slider(16, 2048, value=defaults.max_new_tokens, step=16, label="Max new tokens", render=False),
            picker,
        ],
        additional_inputs_accordion=gr.Accordion("Settings", open=False, render=False),
        examples=[[example] for example in settings.examples],
        run_examples_on_click=True,
        cache_examples=False,
        api_name="chat",
        concurrency_limit=settings.concurrency_limit,
        autofocus=True,
        editable=True,
        save_history=True,
        # Likes go to Prometheus and the request log (record_feedback), not Gradio's CSV file.
        flagging_mode="never",
        analytics_enabled=False,
    )
