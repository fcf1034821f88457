"""A fault-injecting HTTP proxy in front of a real `mlflow server` (127.0.0.1 only).

Modes: ``ok`` (forward), ``error`` (answer 500 without forwarding), ``slow`` (sleep ``delay_s``, then forward),
``hold`` (keep each request until :meth:`FaultProxy.release`, then forward; a safety timeout ``hold_max_s``
releases everything and is counted in ``hold_timeouts``). When the upstream server is gone mid-request (killed),
the client's connection is dropped without an answer, as a crashed server's is (counted as ``hits["dropped"]``).
Counts requests per mode so tests can prove the fault was actually hit, and records every request
(``log``: method, path, start and end time) and the most requests in flight at once (``max_in_flight``).
``error_if(method, path)`` returning True answers that one request with a 500 whatever the mode (an int: that
HTTP status, e.g. 404 for a server without the endpoint).
"""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "content-encoding"}


class FaultProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.mode = "ok"
        self.delay_s = 2.0
        self.hits: Counter[str] = Counter()
        self.log: list[tuple[str, str, float, float]] = []
        self.bodies: list[tuple[str, bytes]] = []  # (path, body) of every request that carried one
        self.in_flight = 0
        self.max_in_flight = 0
        self.error_if: Callable[[str, str], bool | int] | None = None
        self.hold_max_s = 60.0
        self.hold_timeouts = 0
        self.released = threading.Event()
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _handle(self) -> None:
                start = time.monotonic()
                with proxy._lock:
                    proxy.in_flight += 1
                    proxy.max_in_flight = max(proxy.max_in_flight, proxy.in_flight)
                try:
                    self._forward()
                finally:
                    with proxy._lock:
                        proxy.in_flight -= 1
                        proxy.log.append((self.command, self.path, start, time.monotonic()))

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                if body:
                    with proxy._lock:
                        proxy.bodies.append((self.path, body))
                mode = proxy.mode
                status = 500
                if proxy.error_if is not None:
                    code = proxy.error_if(self.command, self.path)
                    if code:
                        mode, status = "error", (500 if code is True else int(code))
                proxy.hits[mode] += 1
                if mode == "error":
                    error_code = "ENDPOINT_NOT_FOUND" if status == 404 else "INTERNAL_ERROR"
                    payload = json.dumps({"error_code": error_code, "message": f"injected {status}"}).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                if mode == "slow":
                    time.sleep(proxy.delay_s)
                if mode == "hold" and not proxy.released.wait(proxy.hold_max_s):
                    with proxy._lock:
                        proxy.hold_timeouts += 1
                    proxy.release()  # a test that never releases must not hang the suite
                req = urllib.request.Request(proxy.upstream + self.path, data=body, method=self.command)
                for k, v in self.headers.items():
                    if k.lower() not in _HOP:
                        req.add_header(k, v)
                try:
                    with urllib.request.urlopen(req, timeout=60) as resp:
                        status, headers, payload = resp.status, resp.headers, resp.read()
                except urllib.error.HTTPError as err:
                    status, headers, payload = err.code, err.headers, err.read()
                except (OSError, http.client.HTTPException):  # upstream gone (killed mid-request)
                    proxy.hits["dropped"] += 1
                    self.close_connection = True
                    return
                self.send_response(status)
                for k, v in headers.items():
                    if k.lower() not in _HOP:
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def release(self) -> None:
        """Let held requests (and all later ones) through."""
        self.mode = "ok"
        self.released.set()

    def __enter__(self) -> FaultProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
