"""The chat page through gradio_client, as programs use it, and what the tests read of its replies."""

import re

import httpx
from gradio_client import Client

GREEDY_INPUTS = ("", 0.0, 1.0, 16)  # system prompt, temperature, top_p, max new tokens (then the model)
# The line under a reply, which names the model that wrote it.
FIGURES = re.compile(r"^(?P<model>[^ ·]+) · \d+ tokens? · \d+\.\d\d s to first token · \d+\.\d tokens/s"
                     r" · \d+ of \d+ prompt tokens cached$")
# The figures note's metadata id: the reply's request id (Serve's, or the API's X-Request-ID), then its model.
FIGURES_ID = re.compile(r"^textbot-figures:(?P<request_id>[^:]*):(?P<model>.+)$")


def model_named(line: str) -> str | None:
    """The model a figures line names; None for a line that is not one."""
    match = FIGURES.match(line)
    return match["model"] if match else None


def page_client(url: str, **kwargs) -> Client:
    """gradio_client with room to wait: it posts each job with httpx's default 5 s timeout,
    which a loaded CI machine's page replica once missed ("timed out" instead of the
    page's answer). The bound says "not hung", not how fast."""
    return Client(url, verbose=False, httpx_kwargs={"timeout": 60}, **kwargs)


def reply_of(output) -> str:
    """An update of /chat: the reply so far (a string), or at the end the reply and its
    figures note (a list of messages)."""
    if isinstance(output, str):
        return output
    return next(m["content"] for m in output if not (m.get("metadata") or {}).get("title"))


def figures_of(output) -> dict:
    return next(m["metadata"] for m in output if (m.get("metadata") or {}).get("title"))


def finished(client: Client, message: str, inputs=GREEDY_INPUTS) -> list:
    job = client.submit(message, *inputs, api_name="/chat")
    list(job)  # drain the stream
    assert job.status().success, "the chat page reported an error"
    return [output for output in job.outputs() if output]


def partials(client: Client, message: str, inputs=GREEDY_INPUTS) -> list[str]:
    return [reply_of(output) for output in finished(client, message, inputs)]


# (method, path below the page): each of Gradio 6.31's routes the page must refuse.
REFUSED = [
    ("GET", "monitoring"), ("GET", "monitoring/summary"), ("GET", "monitoring/not-the-key"),
    ("GET", "gradio_api/runs"), ("GET", "gradio_api/run-history/records"),
    ("GET", "gradio_api/run-history/buckets"), ("POST", "gradio_api/run-history/connect"),
    ("POST", "gradio_api/upload"), ("GET", "gradio_api/upload_progress"),
    ("POST", "gradio_api/process_recording"),
    ("POST", "gradio_api/vibe-edit"), ("POST", "gradio_api/undo-vibe-edit"), ("GET", "gradio_api/vibe-code"),
    ("POST", "gradio_api/vibe-code"), ("POST", "gradio_api/vibe-starter-queries"),
    ("GET", "gradio_api/profiling/summary"),
]


def assert_refused(page_url: str) -> None:
    with httpx.Client(timeout=30) as client:
        for method, path in REFUSED:
            files = {"files": ("note.txt", b"hello")} if path.endswith(("upload", "process_recording")) else None
            response = client.request(method, f"{page_url}{path}", files=files)
            assert response.status_code == 403, (method, path, response.status_code, response.text[:200])
            assert "takes text messages only" in response.json()["detail"]
        config = client.get(f"{page_url}config").json()
        assert config["analytics_enabled"] is False
        assert config["run_history"] is False
        # The page itself still serves.
        assert client.get(page_url).status_code == 200
