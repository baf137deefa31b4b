"""A fault-injecting HTTP proxy on loopback, in front of the S3 test server.

    with FaultyProxy(upstream="http://127.0.0.1:PORT") as proxy:
        proxy.fail("PUT", r"adapter_model", status=500, times=3)   # the next 3 matching requests
        proxy.fail("GET", r"\\.parquet", action="drop")              # every matching request
        os.environ["AWS_ENDPOINT_URL"] = proxy.url

Requests pass through unchanged (the client's Host header and signature included: moto does
not check signatures) unless a rule matches the method and the path with its query. A rule's
action: `status` (answer that HTTP status with an S3-style XML error), `drop` (read the request,
then close the connection without a word, as a crashed server or a cut network does), or
`delay` (wait `seconds`, then pass the request on). `times=None` keeps a rule for good;
`clear()` removes them all. `hits` counts the requests each rule caught.
"""

from __future__ import annotations

import http.client
import re
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse


@dataclass
class Rule:
    method: str
    pattern: re.Pattern[str]
    action: str
    status: int
    seconds: float
    times: int | None
    hits: int = 0


class FaultyProxy:
    def __init__(self, upstream: str):
        parsed = urlparse(upstream)
        self.upstream = (parsed.hostname or "127.0.0.1", parsed.port or 80)
        self.rules: list[Rule] = []
        self.lock = threading.Lock()
        self.requests = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet: pytest shows failures, not traffic
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass  # trailers
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self) -> None:
                body = self._body()
                rule = proxy._match(self.command, self.path)
                if rule is not None and rule.action == "drop":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if rule is not None and rule.action == "status":
                    payload = (
                        f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>InternalError</Code>"
                        f"<Message>injected {rule.status}</Message></Error>"
                    ).encode()
                    self.send_response(rule.status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                if rule is not None and rule.action == "delay":
                    time.sleep(rule.seconds)
                self._forward(body)

            def _forward(self, body: bytes) -> None:
                connection = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "transfer-encoding"}
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                connection.request(self.command, self.path, body=body, headers=headers)
                response = connection.getresponse()
                data = response.read()
                self.send_response(response.status, response.reason)
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                # A HEAD answer carries the object's length, not its own (empty) body's.
                length = response.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                connection.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _match(self, method: str, path: str) -> Rule | None:
        with self.lock:
            self.requests += 1
            for rule in self.rules:
                if rule.method in (method, "*") and rule.pattern.search(path) and rule.times != 0:
                    rule.hits += 1
                    if rule.times is not None:
                        rule.times -= 1
                    return rule
        return None

    def fail(
        self,
        method: str,
        pattern: str,
        *,
        action: str = "status",
        status: int = 500,
        seconds: float = 0.0,
        times: int | None = None,
    ) -> Rule:
        rule = Rule(method, re.compile(pattern), action, status, seconds, times)
        with self.lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self.lock:
            self.rules.clear()

    def __enter__(self) -> FaultyProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
