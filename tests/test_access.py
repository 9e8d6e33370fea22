"""Access control: the API key on /api routes and the chat page's login, switched on by environment."""

import asyncio

import httpx
import pytest
from openai import AuthenticationError, OpenAI
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.conftest import API_KEY, PAGE_LOGIN
from tests.helpers.page import page_client

HELLO = [{"role": "user", "content": "Hello"}]


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [("POST", "/?prompt=Hi", None), ("POST", "/v1/chat/completions", {"messages": HELLO}),
     ("GET", "/v1/models", None), ("GET", "/docs", None), ("GET", "/openapi.json", None)],
)
@pytest.mark.parametrize("authorization", [None, "Bearer wrong-key", f"Basic {API_KEY}"])
def test_every_route_but_health_needs_the_key(http, method, path, body, authorization):
    headers = {"Authorization": authorization} if authorization else {}
    response = http.request(method, f"/tiny-locked{path}", json=body, headers=headers)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"
    assert response.headers["www-authenticate"] == "Bearer"


def test_health_answers_without_the_key(http):
    assert http.get("/tiny-locked/health").status_code == 200


def test_the_key_opens_every_route(http, base_url):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    assert http.post("/tiny-locked/", params={"prompt": "Hi", "max_new_tokens": 3}, headers=headers).status_code == 200
    client = OpenAI(base_url=f"{base_url}/tiny-locked/v1", api_key=API_KEY, max_retries=0)
    assert client.chat.completions.create(model="tiny-chat", messages=HELLO, max_tokens=3).choices[0].message.content
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=f"{base_url}/tiny-locked/v1", api_key="wrong", max_retries=0).models.list()


def test_websocket_without_the_key_is_closed_with_1008(base_url):
    url = base_url.replace("http://", "ws://") + "/tiny-locked/"

    async def attempt(headers):
        async with connect(url, additional_headers=headers) as ws:
            try:
                await ws.send("Hello")
                return await asyncio.wait_for(ws.recv(), 60)
            except ConnectionClosed as closed:
                return closed.rcvd

    refused = asyncio.run(attempt({}))
    assert refused.code == 1008 and "API key" in refused.reason
    assert isinstance(asyncio.run(attempt({"Authorization": f"Bearer {API_KEY}"})), str)


def test_chat_page_login(base_url):
    url = f"{base_url}/locked-page/"
    with pytest.raises(Exception):
        page_client(url)
    client = page_client(url, auth=PAGE_LOGIN)
    assert client.submit("Hello", "", 0.0, 1.0, 16, api_name="/chat").result(timeout=60)
    assert httpx.post(f"{url}login", data={"username": "ada", "password": "wrong"}).status_code >= 400
