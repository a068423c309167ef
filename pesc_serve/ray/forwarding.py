"""One HTTP request carried from the ingress to an engine replica, and its ASGI replay there.

The ingress reads the body once (it needs ``model`` to route), packs the request into an
:class:`HTTPCall` and streams the replica's ASGI messages back.  The replica plays the call
into its own FastAPI app (the app ``python -m pesc_serve`` serves), so every route, error
object and SSE stream is the single server's, unchanged.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.types import ASGIApp, Message

logger = logging.getLogger("pesc_serve.ray")

PREFIX_KEY_CHARS = 256  # prompt characters the prefix router hashes (about 4 KV blocks of text)
REPLICA_HEADER = b"x-pesc-replica"  # which replica answered (for clients and operators)


@dataclass(frozen=True)
class HTTPCall:
    """A request as the ingress received it, plus what the routers need from its body."""

    method: str
    path: str
    query_string: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    client: tuple[str, int] | None = None
    model: str | None = None  # the body's ``model`` (None when absent or not a string)
    prefix_key: str | None = None  # the prompt's first characters (None for requests without one)

    def scope(self) -> dict[str, Any]:
        """The ASGI scope the replica's app sees (the path below Serve's route prefix)."""
        return {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": self.method,
            "scheme": "http",
            "path": self.path,
            "raw_path": self.path.encode(),
            "root_path": "",
            "query_string": self.query_string,
            "headers": list(self.headers),
            "client": self.client,
            "server": None,
            "state": {},
            "extensions": {},
        }


def read_call(method: str, path: str, query_string: bytes, headers: list[tuple[bytes, bytes]], body: bytes,
              client: tuple[str, int] | None) -> HTTPCall:
    """The call for a received request; a body that is not a JSON object is passed on as it is
    (the replica's app answers it with its usual 400)."""
    model = prefix = None
    if body[:1] == b"{":
        try:
            payload = json.loads(body)
        except ValueError:
            payload = None
        if isinstance(payload, dict):
            model = payload["model"] if isinstance(payload.get("model"), str) else None
            prefix = prompt_prefix(payload)
    return HTTPCall(method, path, query_string, headers, body, client, model, prefix)


def prompt_prefix(payload: dict[str, Any], chars: int = PREFIX_KEY_CHARS) -> str | None:
    """The first ``chars`` characters of a chat's messages or a completion's prompt: requests
    that share them share their first KV blocks (a system prompt, a few-shot preamble)."""
    messages, prompt = payload.get("messages"), payload.get("prompt")
    if isinstance(messages, list):
        text = "".join(_content_text(m.get("content")) if isinstance(m, dict) else "" for m in messages)
    elif isinstance(prompt, str):
        text = prompt
    elif isinstance(prompt, list) and prompt:
        first = prompt[0]
        text = first if isinstance(first, str) else ",".join(str(t) for t in prompt[:chars // 4])
    else:
        return None
    return text[:chars] or None


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


class _Replay:
    """The ASGI side of one replayed call: the body once, then a disconnect when the caller
    leaves; what the app sends waits in ``outbox`` until the replica forwards it."""

    def __init__(self, body: bytes) -> None:
        self.body: bytes | None = body
        self.outbox: deque[Message | None] = deque()  # None: the app returned
        self.ready = asyncio.Event()
        self.left = asyncio.Event()

    async def receive(self) -> Message:
        if self.body is not None:
            body, self.body = self.body, None
            return {"type": "http.request", "body": body, "more_body": False}
        await self.left.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        self.put(message)

    def put(self, message: Message | None) -> None:
        self.outbox.append(message)
        self.ready.set()

    async def take(self) -> list[Message | None]:
        """Everything sent since the last take (waiting for at least one message)."""
        while not self.outbox:
            self.ready.clear()
            await self.ready.wait()
        taken = list(self.outbox)
        self.outbox.clear()
        return taken

    def ended(self) -> bool:
        """The app has sent its last message (or returned)."""
        return any(m is None or (m["type"] == "http.response.body" and not m.get("more_body", False))
                   for m in self.outbox)

    async def settle(self, until: float) -> None:
        """Wait until the loop time ``until`` or the app's last message, whichever comes first."""
        loop = asyncio.get_running_loop()
        while not self.ended() and (left := until - loop.time()) > 0:
            self.ready.clear()
            try:
                await asyncio.wait_for(self.ready.wait(), left)
            except asyncio.TimeoutError:
                return


async def replay(app: ASGIApp, call: HTTPCall, replica_id: str, background: set[asyncio.Task],
                 interval_s: float = 0.0) -> AsyncIterator[Message]:
    """Run ``call`` through ``app``; yield its response messages, the start tagged with the replica.

    Body messages already waiting are merged into one, and after the first body a stream's
    messages leave at most every ``interval_s`` (its end at once), so a stream crosses the Serve
    hops in fewer, larger pieces.  Closing the iterator early (the client left, the ingress
    cancelled) shows the app a disconnect, which aborts the request's engine work; the app's
    task finishes in ``background``.
    """
    io = _Replay(call.body)
    loop = asyncio.get_running_loop()
    next_send: float | None = None  # the first body leaves at once (time to first token)

    async def run() -> None:
        try:
            await app(call.scope(), io.receive, io.send)
        except Exception:  # the app has answered with a 500 already, as under uvicorn
            logger.exception("exception in the ASGI application")
        finally:
            io.put(None)

    task = asyncio.ensure_future(run())
    try:
        done = False
        while not done:
            if next_send is not None:
                await io.settle(next_send)
            taken = await io.take()
            if interval_s > 0 and any(m is not None and m["type"] == "http.response.body" for m in taken):
                next_send = loop.time() + interval_s
            for message in _merged(taken):
                if message is None:
                    done = True
                    break
                if message["type"] == "http.response.start":
                    headers = list(message.get("headers", [])) + [(REPLICA_HEADER, replica_id.encode())]
                    message = dict(message, headers=headers)
                yield message
                if message["type"] == "http.response.body" and not message.get("more_body", False):
                    done = True
                    break
    finally:
        io.left.set()
        if not task.done():
            background.add(task)
            task.add_done_callback(background.discard)


def _merged(messages: list[Message | None]) -> list[Message | None]:
    """Consecutive body messages joined into one."""
    out: list[Message | None] = []
    for message in messages:
        last = out[-1] if out else None
        if (message is not None and last is not None and message["type"] == last["type"] == "http.response.body"
                and last.get("more_body", False)):
            out[-1] = {"type": "http.response.body", "body": last.get("body", b"") + message.get("body", b""),
                       "more_body": message.get("more_body", False)}
        else:
            out.append(message)
    return out
