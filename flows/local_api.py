"""A temporary Prefect API for `alignflow run` when no API is configured, started before the CLI's imports.

Without PREFECT_API_URL, Prefect starts a temporary server itself, but only once the flow is called:
it imports its server package in this process (~4 s), then waits for the server process to import
it again and answer (~4 s), and at exit waits for it to stop. Here the same server (Prefect's ASGI
app, with the settings Prefect gives its temporary one) starts first, in its own process, so that it
boots while this process imports the flow, MLflow and the stages' shared code; the flow then runs
against it under `temporary_settings(PREFECT_API_URL=...)`. A configured API (a profile, the
environment) is used as is.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request

HEALTH_TIMEOUT_S = 120.0


class LocalAPI:
    def __init__(self):
        from prefect.settings import get_current_settings

        settings = get_current_settings()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/api"
        env = {**os.environ, **settings.to_environment_variables(exclude_unset=True),
               # what Prefect sets for its own temporary server: no UI, no background services
               "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
        self.proc = subprocess.Popen(
            ["setpriv", "--pdeathsig", "TERM", "--", sys.executable, "-m", "uvicorn", "--factory",
             "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
             "--log-level", "error", "--lifespan", "on"], env=env, stdin=subprocess.DEVNULL)
        # Registered before Prefect's log and event workers register theirs: atexit runs them first
        # (they send the last logs to this server), then this stop.
        atexit.register(self.stop)

    def wait_ready(self) -> bool:
        deadline = time.monotonic() + HEALTH_TIMEOUT_S
        while time.monotonic() < deadline and self.proc.poll() is None:
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return True
            time.sleep(0.05)
        return False

    def settings(self):
        from prefect.settings import PREFECT_API_URL, temporary_settings

        return temporary_settings(updates={PREFECT_API_URL: self.url})

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_if_unconfigured() -> LocalAPI | None:
    """A LocalAPI when this process has no Prefect API and may start a temporary one, else None."""
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if settings.api.url or not settings.server.ephemeral.enabled:
        return None
    return LocalAPI()


@contextlib.contextmanager
def prefect_api(api: LocalAPI | None):
    """Run the flow against `api` (if it answered), else against whatever Prefect would use."""
    if api is None or not api.wait_ready():
        if api is not None:
            print("alignflow: the local Prefect API did not start; Prefect starts its own", file=sys.stderr)
            api.stop()
        yield
        return
    try:
        with api.settings():
            yield
    finally:
        drain_prefect_workers()  # the last logs and events go to the API before it stops
        api.stop()


def drain_prefect_workers() -> None:
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all()
    EventsWorker.drain_all()
