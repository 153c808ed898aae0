"""Test helpers for the eval, determinism and run tests: a tiny scripted HTTP server on loopback.

``FakeServer`` answers SGLang's endpoints from a Python callable, so a test can script failures (HTTP 429,
500, malformed bodies, stalls, a server that goes away) that the simulated server does not offer. It binds
``127.0.0.1`` port 0 and never talks to anything else.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from mlaprop.mgsm import MgsmDataset, load_dataset


@dataclass
class Answer:
    """What the fake server sends back: status, JSON body (or raw text), headers, delay (seconds)."""

    status: int = 200
    body: Any = None
    text: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0


Handler = Callable[[str, str, Any], Answer]


def chat_answer(content: str | None, completion_tokens: int = 10, finish_reason: str = "stop") -> Answer:
    """An OpenAI chat-completions reply carrying ``content``."""
    return Answer(
        body={
            "id": "x",
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": finish_reason,
                }
            ],
            "usage": {
                "prompt_tokens": 5,
                "completion_tokens": completion_tokens,
                "total_tokens": 5 + completion_tokens,
            },
        }
    )


MODELS = Answer(body={"object": "list", "data": [{"id": "fake-model", "object": "model"}]})


class FakeServer:
    """A threaded HTTP server on ``127.0.0.1:0`` dispatching every request to ``handler(method, path, json)``.

    Counts requests per path and tracks how many are in flight. :meth:`kill` closes the listening socket so
    later connections are refused, like a crashed server.
    """

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.lock = threading.Lock()
        self.counts: dict[str, int] = {}
        self.in_flight = 0
        self.max_in_flight = 0
        self.bodies: list[tuple[str, Any, dict[str, str]]] = []
        self.alive = True
        outer = self

        class _H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # silence
                return

            def _serve(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                payload = json.loads(raw) if raw else None
                with outer.lock:
                    outer.counts[self.path] = outer.counts.get(self.path, 0) + 1
                    outer.in_flight += 1
                    outer.max_in_flight = max(outer.max_in_flight, outer.in_flight)
                    outer.bodies.append((self.path, payload, dict(self.headers)))
                try:
                    ans = outer.handler(method, self.path, payload)
                    if ans.delay_s:
                        time.sleep(ans.delay_s)
                finally:
                    with outer.lock:
                        outer.in_flight -= 1
                data = ans.text.encode() if ans.text is not None else json.dumps(ans.body).encode()
                self.send_response(ans.status)
                self.send_header("Content-Type", "text/plain" if ans.text is not None else "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in ans.headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._serve("GET")

            def do_POST(self) -> None:
                self._serve("POST")

        class _Server(ThreadingHTTPServer):
            request_queue_size = 1024  # the default 5 resets bursts of concurrent connections

        self.httpd = _Server(("127.0.0.1", 0), _H)
        self.httpd.daemon_threads = True
        self.httpd.handle_error = lambda request, client_address: None  # type: ignore[method-assign]
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def count(self, path: str) -> int:
        """Requests received on ``path``."""
        with self.lock:
            return self.counts.get(path, 0)

    def kill(self) -> None:
        """Stop serving and close the socket: new connections are refused."""
        if self.alive:
            self.alive = False
            self.httpd.shutdown()
            self.httpd.server_close()


@contextlib.contextmanager
def serve(handler: Handler) -> Iterator[FakeServer]:
    """A :class:`FakeServer` for the ``with`` block, killed at its end."""
    server = FakeServer(handler)
    try:
        yield server
    finally:
        server.kill()


def mgsm_path(mgsm_dir: Path, lang: str = "en") -> Path:
    """The shared MGSM file for ``lang``."""
    return mgsm_dir / f"mgsm_{lang}.tsv"


def load_en(mgsm_dir: Path) -> MgsmDataset:
    """The real MGSM-en file, validated."""
    return load_dataset(mgsm_path(mgsm_dir), "en")


def question_of(payload: Any) -> str:
    """The user message of a chat request."""
    return str(payload["messages"][0]["content"])


def closed_port() -> int:
    """A loopback port with nothing listening (bound, then released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
