"""A real HTTP server on 127.0.0.1 serving a folder (a remote volume for tests).

``kill()`` stops it (later reads are refused); ``stall()`` keeps accepting requests but
never answers them (a remote volume that stops answering) until ``resume()``.
"""

from __future__ import annotations

import functools
import http.server
import threading
from pathlib import Path


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def handle_one_request(self) -> None:
        server = self.server
        if server.stalled.is_set():  # type: ignore[attr-defined]
            server.released.wait(120)  # type: ignore[attr-defined]
            self.close_connection = True
            return
        super().handle_one_request()


class VolumeServer:
    """Serves ``root`` over HTTP on 127.0.0.1 (``port`` 0: any free port)."""

    def __init__(self, root: Path, port: int = 0) -> None:
        handler = functools.partial(_Handler, directory=str(root))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
        self.httpd.daemon_threads = True
        self.httpd.stalled = threading.Event()  # type: ignore[attr-defined]
        self.httpd.released = threading.Event()  # type: ignore[attr-defined]
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def url(self, path: str) -> str:
        """The URL of ``path`` under the served folder."""
        return f"http://127.0.0.1:{self.port}/{path}"

    def stall(self) -> None:
        """Accept every request from now on and never answer it."""
        self.httpd.released.clear()  # type: ignore[attr-defined]
        self.httpd.stalled.set()  # type: ignore[attr-defined]

    def resume(self) -> None:
        """Answer again (the stalled requests are closed unanswered)."""
        self.httpd.stalled.clear()  # type: ignore[attr-defined]
        self.httpd.released.set()  # type: ignore[attr-defined]

    def kill(self) -> None:
        """Stop serving: later connections are refused."""
        self.resume()
        self.httpd.shutdown()
        self.httpd.server_close()
