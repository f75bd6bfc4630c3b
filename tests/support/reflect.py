"""A reflecting teacher: a loopback proxy in front of the sandbox teacher that writes the key each
request's ``Authorization`` header carries back into some replies, raw, URL-encoded and base64."""

from __future__ import annotations

import base64
import json
import threading
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def key_spellings(key: str) -> list[str]:
    """How the reflecting teacher writes a key back (each is a way the key must never be stored)."""
    b64 = [
        enc((pad + key).encode()).decode()
        for pad in ("", "x", "xy")
        for enc in (base64.b64encode, base64.urlsafe_b64encode)
    ]
    return [
        key,
        urllib.parse.quote(key, safe=""),
        urllib.parse.quote_plus(key),
        key.replace("-", "%2D"),  # a full encoder's spelling of an unreserved character
        json.dumps(key).strip('"').replace("-", "\\u002d"),
        *b64,
        urllib.parse.quote(b64[0], safe=""),
    ]


class _Proxy(BaseHTTPRequestHandler):
    upstream: str = ""
    reflected: list[str]  # question texts whose replies held the key
    lock: threading.Lock

    def log_message(self, *args) -> None:  # quiet
        pass

    def _forward(self, body: bytes | None) -> tuple[int, dict, bytes]:
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
        req = urllib.request.Request(
            self.upstream + self.path, data=body, headers=headers, method=self.command
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    def _reply(self, status: int, headers: dict, data: bytes) -> None:
        self.send_response(status)
        for k, v in headers.items():
            if k.lower() not in ("content-length", "transfer-encoding", "connection", "date", "server"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._reply(*self._forward(None))

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        status, headers, data = self._forward(body)
        key = (self.headers.get("Authorization") or "").removeprefix("Bearer ").strip()
        if status == 200 and key and self.path.endswith("/chat/completions"):
            request = json.loads(body)
            question = json.dumps(request.get("messages"), sort_keys=True)
            if zlib.crc32(question.encode()) % 2 == 0:  # every other question, deterministically
                reply = json.loads(data)
                leak = " ".join(key_spellings(key))
                for choice in reply.get("choices", []):
                    msg = choice["message"]
                    msg["content"] = f"(my key, for the record: {leak})\n" + (msg.get("content") or "")
                    if msg.get("reasoning_content"):
                        msg["reasoning_content"] = f"Authorization: Bearer {key}\n" + msg["reasoning_content"]
                with self.lock:
                    self.reflected += [question] * len(reply.get("choices", []))
                data = json.dumps(reply).encode()
        self._reply(status, headers, data)


@contextmanager
def reflecting_teacher(upstream: str) -> Iterator[tuple[str, list[str]]]:
    """(base URL of the reflecting proxy in front of ``upstream``, the questions it reflected, one
    per reflected choice)."""
    parsed = urllib.parse.urlsplit(upstream)
    root = f"{parsed.scheme}://{parsed.netloc}"
    handler = type("Reflect", (_Proxy,), {"upstream": root, "reflected": [], "lock": threading.Lock()})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"{parsed.scheme}://127.0.0.1:{server.server_port}{parsed.path}", handler.reflected
    finally:
        server.shutdown()
        server.server_close()
