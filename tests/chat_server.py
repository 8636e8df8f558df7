"""A real local HTTP server speaking the chat-completions protocol (POST ``/v1/chat/completions``), for the tests of
the LLM prompt writers: no client code is replaced. ``reply(body) -> str`` is the assistant's text for a request
body; every request is recorded (path, Authorization header, body)."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Callable


class ChatServer:
    def __init__(self, reply: Callable[[dict], str]):
        self.requests: list[dict] = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                owner.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                message = {"role": "assistant", "content": reply(body)}
                payload = json.dumps({"choices": [{"message": message}]}).encode()
                self.send_response(200 if self.path == "/v1/chat/completions" else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.server.server_port}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
