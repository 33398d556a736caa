"""A real uvicorn server on 127.0.0.1 (a free port) around a `Service`, for the serve tests."""
from __future__ import annotations

import contextlib
import socket
import threading
import time


@contextlib.contextmanager
def running_server(service):
    """Yields the base URL while the server runs in a thread; stops it on exit."""
    import uvicorn

    from diffprune.serve.app import create_app

    srv = uvicorn.Server(uvicorn.Config(create_app(service), log_level="warning"))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not srv.started and thread.is_alive() and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        srv.should_exit = True
        thread.join(timeout=30)
        sock.close()
