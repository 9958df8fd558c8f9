"""`python -m dashboard.serve [streamlit options]`: `streamlit run dashboard/app.py` with the heavy modules the pages
use imported first, in the server process.

Streamlit runs every page script inside its server process, so the first page a person opens after `rlcore
dashboard` used to pay for importing torch, altair, optuna, MLflow's client and pydantic (about 2 s here) on top of
its own work. Importing them before the server starts moves that cost to start-up, which happens once. Modules with
`st.cache_data` functions (`dashboard.common`) are left to the first run, inside Streamlit's runtime.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

APP = Path(__file__).resolve().parent / "app.py"


def warm() -> None:
    import altair  # noqa: F401
    import mlflow.tracking  # noqa: F401
    import optuna  # noqa: F401
    import torch  # noqa: F401 - the Lessons page's live controls compute with rlcore's functions

    import dashboard.controls  # noqa: F401
    import dashboard.data  # noqa: F401
    import dashboard.findings  # noqa: F401
    import dashboard.launcher  # noqa: F401
    import rlcore.lessons  # noqa: F401
    import rlcore.loading  # noqa: F401
    import rlcore.sweep  # noqa: F401


# JS for a browser: the page's script has run to its end (the attribute Streamlit's own e2e tests wait on).
SCRIPT_DONE = ("() => document.querySelector('[data-testid=\"stApp\"]')?.getAttribute('data-test-script-state') "
               "=== 'notRunning'")


@contextmanager
def background(cwd: Path, command: list[str] | None = None, env: dict[str, str] | None = None,
               timeout_s: float = 60) -> Iterator[str]:
    """A server on a free 127.0.0.1 port, run in `cwd`, for tests and benchmarks: yields its URL once
    `/_stcore/health` answers, and stops it afterwards. `command` defaults to `rlcore dashboard`; it gets
    `--port N` appended (a plain `streamlit run` command gets `--server.port N`)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = command or [sys.executable, "-m", "rlcore.cli", "dashboard"]
    cmd = [*cmd, "--server.port" if "streamlit" in cmd else "--port", str(port)]
    log = tempfile.TemporaryFile()  # not a pipe: a server whose pipe nobody reads blocks once it is full
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout_s
        while True:
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).status == 200:
                    break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    proc.kill()
                    log.seek(0)
                    raise RuntimeError(f"the server did not start: {log.read()[-2000:].decode(errors='replace')}") \
                        from None
                time.sleep(0.25)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


LOCAL_HOSTS = ("127.0.0.1", "localhost")


class TellBasePath:
    """Tell Streamlit's page where its server is, so that a deep link asks for nothing that is refused.

    Without it the page finds its server by trying paths: `/runs` first asks `/runs/_stcore/health` and
    `/runs/_stcore/host-config` (two 404s in every deep link's log), then `/`. Answering those two made the page take
    `/runs` for the base and route wrongly; instead every HTML page carries `window.__streamlit.BACKEND_BASE_URL`
    (the setting Streamlit's page reads for hosts that embed it), so the page tries only the real base."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("method") != "GET":
            return await self.app(scope, receive, send)
        from streamlit import config

        base = json.dumps(("/" + (config.get_option("server.baseUrlPath") or "").strip("/")).rstrip("/") + "/")
        script = f"<script>window.__streamlit={{BACKEND_BASE_URL:window.location.origin+{base}}}</script>".encode()
        start: dict = {}
        body: list[bytes] = []

        async def rewrite(message) -> None:
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers", []))
                if not headers.get(b"content-type", b"").startswith(b"text/html"):
                    start["pass"] = True
                    return await send(message)
                start.update(message)
                return None
            if start.get("pass"):
                return await send(message)
            body.append(message.get("body", b""))
            if message.get("more_body"):
                return None
            html = b"".join(body).replace(b"<head>", b"<head>" + script, 1)
            headers = [(k, v) for k, v in start.get("headers", []) if k != b"content-length"]
            await send({**start, "headers": [*headers, (b"content-length", str(len(html)).encode())]})
            await send({"type": "http.response.body", "body": html})

        await self.app(scope, receive, rewrite)


def accept_only_local_hosts(argv: list[str]) -> None:
    """Refuse any request whose Host header is not this machine (400), HTTP and websocket alike: a page on another
    site that resolves its own name to 127.0.0.1 (DNS rebinding) must not reach the dashboard. A server bound to
    another address on purpose (`--server.address`) also accepts that name."""
    from starlette.middleware import Middleware
    from starlette.middleware.trustedhost import TrustedHostMiddleware
    from streamlit.web.server.starlette import starlette_app

    bound = argv[argv.index("--server.address") + 1] if "--server.address" in argv[:-1] else None
    allowed = [*LOCAL_HOSTS, *([bound] if bound and bound not in ("0.0.0.0", "::") else [])]
    inner = starlette_app.create_streamlit_middleware

    def middleware():  # TellBasePath innermost: it edits the HTML before the gzip middleware compresses it
        return [Middleware(TrustedHostMiddleware, allowed_hosts=allowed), *inner(), Middleware(TellBasePath)]

    starlette_app.create_streamlit_middleware = middleware


if __name__ == "__main__":
    sys.path.insert(0, str(APP.parent.parent))
    warm()
    accept_only_local_hosts(sys.argv[1:])
    from streamlit.web.cli import main

    sys.argv = ["streamlit", "run", str(APP), *sys.argv[1:]]
    sys.exit(main())
