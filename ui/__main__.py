"""The shareable demo: the same chat page, standalone, streaming from a Textbot backend over HTTP.

    python -m ui --backend http://HOST:8000/api --share
"""

import argparse
import contextlib
import io
import json
import logging
import os
from pathlib import Path

from backend.config import DeployConfig
from ui.hardening import HOSTING, CodeEditingSwitchedOn, app_kwargs, refuse_code_editing
from ui.page import LOOK, build_page, login
from ui.settings import ChatPageSettings
from ui.sources import HttpBackend

DEPLOY_YAML = Path(__file__).resolve().parent.parent / "deploy.yaml"


def page_settings(config: Path) -> ChatPageSettings:
    """The chat application's args in deploy.yaml, so both modes start from the same defaults."""
    if not config.is_file():
        return ChatPageSettings()
    return ChatPageSettings.model_validate(DeployConfig.read(config).page_args())


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ui", description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="http://127.0.0.1:8000/api",
                        help="Textbot's API root (default: %(default)s)")
    parser.add_argument("--share", action="store_true", help="ask Gradio for a public share link")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=7860, help="port to listen on (default: %(default)s)")
    parser.add_argument("--config", type=Path, default=DEPLOY_YAML, help="deploy.yaml to take defaults from")
    return parser.parse_args(argv)


log = logging.getLogger("textbot.page")


def record_feedback(value: str, request_id: str | None) -> None:
    """Standalone there is no Ray to export a counter: one line on stderr per like or dislike,
    with the backend's request id (the X-Request-ID of the reply, on its log line there)."""
    log.info(json.dumps({"event": "feedback", "value": value, "reply_request_id": request_id}))


def main(argv=None) -> None:
    args = parse_args(argv)
    if not args.backend.startswith(("http://", "https://")):
        raise SystemExit(f"--backend must be an http(s) URL such as http://127.0.0.1:8000/api, not {args.backend!r}")
    try:
        refuse_code_editing()
        settings = page_settings(args.config)
        backend = HttpBackend(args.backend, api_key=os.environ.get("TEXTBOT_API_KEY"))
        page = build_page(backend, settings, record_feedback, storage_key="textbot_conversations")
    except (CodeEditingSwitchedOn, ValueError) as error:
        raise SystemExit(str(error)) from None
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    gradio_said = io.StringIO()
    with contextlib.redirect_stdout(gradio_said):  # Gradio explains a failed share link in 10 lines
        _, local_url, share_url = page.launch(
            server_name=args.host, server_port=args.port, share=args.share, prevent_thread_lock=True,
            quiet=True, auth=login(), app_kwargs=app_kwargs(), **HOSTING, **LOOK,
        )
    print(f"Chat page on {local_url} streaming from {args.backend}", flush=True)
    if args.share and share_url:
        print(f"Share link: {share_url}", flush=True)
    elif args.share:
        reason = next((line.strip() for line in gradio_said.getvalue().splitlines() if line.strip()), "unknown")
        print(f"No share link (Gradio: {reason}); serving on {local_url} only.", flush=True)
    page.block_thread()


if __name__ == "__main__":
    main()
