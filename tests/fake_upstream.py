"""A real OpenAI-compatible HTTP server on loopback that answers with fixed generic replies.

It can be slow (`delay`), fail (`status`, `message`), or be down (`stop()`); it keeps the
requests it received so tests can check what the proxy forwarded.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Server(ThreadingHTTPServer):
    request_queue_size = 64  # the default backlog (5) resets connections under concurrent load


class FakeUpstream:
    def __init__(self, reply: str = "Thank you for your message. I will review the document and reply soon.") -> None:
        self.reply = reply
        self.status = 200
        self.message = ""
        self.delay = 0.0
        self.echo = False  # append the last user message, so every reply differs
        self.requests: list[dict] = []
        self._lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
                with owner._lock:
                    owner.requests.append({"path": self.path, "body": body, "auth": self.headers.get("authorization")})
                time.sleep(owner.delay)
                if owner.status != 200:
                    payload = {"error": {"message": owner.message or "upstream failure", "type": "server_error"}}
                else:
                    text = owner.reply
                    if owner.echo:
                        text += f" ({body['messages'][-1]['content']})"
                    payload = {
                        "id": "chatcmpl-fake", "object": "chat.completion", "created": 0,
                        "model": body.get("model") or "fake",
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
                    }
                data = json.dumps(payload).encode()
                try:
                    self.send_response(owner.status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the proxy gave up waiting
                    pass

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = _Server(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> FakeUpstream:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Shut down and close the port: the upstream is then down."""
        if self.thread.is_alive():
            self.httpd.shutdown()
        self.httpd.server_close()
