"""An HTTP proxy that holds every request `latency` seconds, then forwards it to an object
store's API server: a far-away bucket, for benchmarks against a local emulator.

    proxy = LatencyProxy("http://127.0.0.1:4443", latency=0.05)
    url = proxy.start()   # point STORAGE_EMULATOR_HOST at url
    ...
    proxy.stop()

Each connection gets its own thread, so concurrent requests wait concurrently, as they do on
a real network: the latency is per request, not a bandwidth cap.
"""

from __future__ import annotations

import http.client
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# Headers that belong to one connection, not to the request (RFC 9110, 7.6.1).
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te",
              "trailer", "upgrade", "content-length", "host"}  # fmt: skip


class _Forward(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the store's clients expect

    def _forward(self) -> None:
        server: _Server = self.server  # type: ignore[assignment]
        time.sleep(server.latency)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        status, reply_headers, data = server.send_upstream(self.command, self.path, body, headers)
        self.send_response(status)
        for k, v in reply_headers:
            if k.lower() not in HOP_BY_HOP:
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _forward

    def log_message(self, *args) -> None:  # no line per request on stderr
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # the default 5 drops a burst of connections for a 1 s retry

    def __init__(self, upstream: str, latency: float):
        super().__init__(("127.0.0.1", 0), _Forward)
        parsed = urllib.parse.urlsplit(upstream)
        self.upstream_host, self.upstream_port = parsed.hostname, parsed.port or 80
        self.latency = latency
        self._local = threading.local()  # one upstream connection per handler thread

    def handle_error(self, request, client_address) -> None:
        """A client that hung up mid-reply (a reader closed with requests in flight) is not
        an error of the proxy; anything else is reported as usual."""
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)

    def send_upstream(self, method: str, target: str, body: bytes | None, headers: dict):
        """(status, headers, body) of the request sent to the upstream server."""
        for attempt in range(2):  # a kept-alive connection the server closed: reconnect once
            conn = getattr(self._local, "conn", None)
            if conn is None:
                conn = http.client.HTTPConnection(self.upstream_host, self.upstream_port)
                self._local.conn = conn
            try:
                conn.request(method, target, body, headers)
                reply = conn.getresponse()
                return reply.status, reply.getheaders(), reply.read()
            except (http.client.HTTPException, ConnectionError):
                conn.close()
                self._local.conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")


class LatencyProxy:
    """A proxy at http://127.0.0.1:<free port> in front of `upstream` (http://host:port)."""

    def __init__(self, upstream: str, latency: float):
        self._server = _Server(upstream, latency)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> str:
        self._thread.start()
        return self.url

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> LatencyProxy:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
