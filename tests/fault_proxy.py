"""A small fault-injecting HTTP proxy for the S3-protocol test server, listening on 127.0.0.1 only.

Each request gets its fate from a seeded schedule (request number n -> fault), so a run repeats:
- `slowdown`: answered 503 with S3's SlowDown error body (throttling);
- `reset`: the connection is reset (RST) after the request was read, before any answer;
- `slow`: answered correctly after `slow_s` seconds;
otherwise forwarded to the upstream server unchanged. `blackout` (substrings of the request path) makes
every matching GET answer 503, as an object on a failing storage node would, until it is cleared.
Usage: `with FaultProxy(upstream, seed=14, slowdown=0.25) as proxy: ... proxy.endpoint ...`.
"""
from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

SLOWDOWN_BODY = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
                 b'<Message>Please reduce your request rate.</Message></Error>')
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


class FaultProxy:
    def __init__(self, upstream: str, *, seed: int = 0, slowdown: float = 0.0, reset: float = 0.0,
                 slow: float = 0.0, slow_s: float = 0.5):
        self.upstream = urlsplit(upstream)
        self.rng = random.Random(seed)
        self.rates = (slowdown, reset, slow)
        self.slow_s = slow_s
        self.blackout: set[str] = set()
        self.counts: Counter = Counter()
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _handle(self):
                body = self._read_body()
                fate = proxy.fate(self.command, self.path)
                if fate == "reset":
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    self.connection.close()
                    return
                if fate in ("slowdown", "blackout"):
                    payload = SLOWDOWN_BODY if self.command != "HEAD" else b""
                    self.send_response(503, "Slow Down")
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOWDOWN_BODY)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                if fate == "slow":
                    time.sleep(proxy.slow_s)
                self._forward(body)

            def _read_body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass  # trailers
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _forward(self, body: bytes):
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in HOP_BY_HOP and k.lower() != "content-length":
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data) if self.command != "HEAD"
                                                       else resp.getheader("Content-Length", "0")))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def fate(self, method: str, path: str) -> str:
        with self._lock:
            self.counts["requests"] += 1
            if method == "GET" and any(s in path for s in self.blackout):
                self.counts["blackout"] += 1
                return "blackout"
            x = self.rng.random()  # drawn for every request, in arrival order: the schedule
            slowdown, reset, slow = self.rates
            for name, rate in (("slowdown", slowdown), ("reset", reset), ("slow", slow)):
                if x < rate:
                    self.counts[name] += 1
                    return name
                x -= rate
            return "ok"

    def __enter__(self) -> "FaultProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
