"""Recorded real server bodies (``tests/fixtures/servers``) and misbehaving loopback teachers."""

from __future__ import annotations

import http.server
import json
import socket
import threading
import time
from pathlib import Path

FIXTURES = Path(__file__).parents[1] / "fixtures" / "servers"


def recorded(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


# ---------------------------------------------------------------- misbehaving loopback teachers
# Real HTTP servers on 127.0.0.1 in a thread (the fast tier's convention for loopback teachers,
# as the sandbox): a hung one and a slow one, for the outage rule (tests/inference/test_outage.py).


class HungTeacher:
    """Accepts connections and reads what is sent, never answers (a hung process whose socket is
    still open): chat requests and ``GET /models`` alike wait for ever."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=256)
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.accepted = 0
        self._held: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            self._held.append(conn)  # read nothing, answer nothing, keep it open

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for conn in self._held:
            conn.close()
        self.sock.close()

    def __enter__(self) -> HungTeacher:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def completion_body(content: str, completion_tokens: int) -> bytes:
    return json.dumps(
        {
            "id": "chatcmpl-slow",
            "object": "chat.completion",
            "model": "slow-r1",
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
            ],
            "usage": {
                "prompt_tokens": 20,
                "completion_tokens": completion_tokens,
                "total_tokens": 20 + completion_tokens,
            },
        }
    ).encode()


class SlowTeacher:
    """Answers ``GET /v1/models`` at once; a chat completion is generated slowly: its body is sent
    in ``chunks`` pieces (chunked transfer) one every ``every_s`` seconds, as a long generation
    trickles out (``chunks * every_s`` seconds in all). Threaded: probes are answered meanwhile."""

    def __init__(self, chunks: int = 20, every_s: float = 0.5, answer: str = "The answer is A.") -> None:
        teacher = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _send(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                teacher.probes += 1
                self._send(200, json.dumps({"object": "list", "data": [{"id": "slow-r1"}]}).encode())

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                teacher.chats += 1
                started = time.monotonic()
                # A long reasoning trace: many tokens, sent piece by piece.
                body = completion_body(("step " * 400) + teacher.answer, 8192)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                size = -(-len(body) // teacher.chunks)
                for i in range(teacher.chunks):
                    time.sleep(teacher.every_s)
                    piece = body[i * size : (i + 1) * size]
                    if piece:
                        self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                        self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
                teacher.durations.append(time.monotonic() - started)

        self.chunks, self.every_s, self.answer = chunks, every_s, answer
        self.probes = 0
        self.chats = 0
        self.durations: list[float] = []
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self._thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)

    def __enter__(self) -> SlowTeacher:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
