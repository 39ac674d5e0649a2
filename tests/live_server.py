"""A real uvicorn server in a daemon thread, for the tests that drive the app over a socket
(the openai client, a browser, a client that hangs up)."""
import socket
import threading
import time
from contextlib import contextmanager

import httpx
import uvicorn


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve(app):
    """Serve `app` on a free 127.0.0.1 port until the block ends; yields the base URL once
    /health answers."""
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.05)
        yield url
    finally:
        srv.should_exit = True
        thread.join(timeout=10)
