"""A JupyterLab server and a headless Chromium for the browser tests (marker ``browser``).

Needs Debian's ``chromium`` package (``apt-get install chromium``: Playwright's own browser
download cannot run on these machines) and the ``playwright`` Python package (the ``browser``
extra). Without either, the tests are skipped with a one-line reason; with
``PKM_REF_REQUIRE_BROWSER=1`` (set by ``.ci/run``) a missing browser is a failure instead.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",  # CI runs as root, where Chromium's sandbox refuses to start
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
REPOSITORY = Path(__file__).resolve().parents[2]
SERVER_START_TIMEOUT_S = 90

# JupyterLab user settings: no autosave (the test never writes a notebook), no news pop-up over
# the page, and every cell attached to the page (the default windowing leaves cells out of view
# unrendered, whose prompts and outputs the test reads).
LAB_SETTINGS = {
    "@jupyterlab/docmanager-extension/plugin": {"autosave": False},
    "@jupyterlab/apputils-extension/notification": {
        "fetchNews": "false",
        "checkForUpdates": False,
    },
    "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
}


def _missing_browser() -> str | None:
    """Why the browser tests cannot run here, or None when they can."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return 'playwright is not installed (pip install -e ".[browser]")'
    if not CHROMIUM.exists():
        return f"{CHROMIUM} not found (apt-get install chromium)"
    return None


@pytest.fixture(scope="session")
def browser_available() -> None:
    """Skip (or, with PKM_REF_REQUIRE_BROWSER=1, fail) when Chromium or Playwright is missing."""
    reason = _missing_browser()
    if reason is None:
        return
    if os.environ.get("PKM_REF_REQUIRE_BROWSER") == "1":
        pytest.fail(f"browser tests required (PKM_REF_REQUIRE_BROWSER=1) but {reason}")
    pytest.skip(f"browser tests: {reason}")


@dataclass(frozen=True)
class LabServer:
    """A running JupyterLab: its address, token, served folder and log."""

    url: str
    token: str
    root: Path
    log: Path

    def api(self, path: str) -> object:
        """GET ``/api/<path>`` as JSON."""
        request = urllib.request.Request(
            f"{self.url}/api/{path}", headers={"Authorization": f"token {self.token}"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)

    def shutdown_kernels(self) -> None:
        """End every session and its kernel (between notebooks)."""
        for session in self.api("sessions"):
            request = urllib.request.Request(
                f"{self.url}/api/sessions/{session['id']}",
                method="DELETE",
                headers={"Authorization": f"token {self.token}"},
            )
            urllib.request.urlopen(request, timeout=30).close()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _write_settings(folder: Path) -> None:
    for plugin, values in LAB_SETTINGS.items():
        path = folder / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))


def _wait_until_serving(server: LabServer, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"JupyterLab exited with code {process.returncode}; log: {server.log}")
        try:
            server.api("status")
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    pytest.fail(f"JupyterLab did not answer within {SERVER_START_TIMEOUT_S} s; log: {server.log}")


@pytest.fixture(scope="session")
def lab_server(browser_available, tmp_path_factory) -> Iterator[LabServer]:
    """JupyterLab on 127.0.0.1 serving a scratch folder, with its own settings and runtime.

    The scratch folder holds ``notebooks/`` (the tests copy notebooks there) and a link to the
    repository's ``figures/``, so that notebooks reading ``../figures`` see the committed results
    and the repository's notebooks are never opened, let alone saved. Kernels run the smoke
    profile and import the ``pkm_ref`` of ``PYTHONPATH`` when it is set.
    """
    base = tmp_path_factory.mktemp("jupyterlab")
    root = base / "root"
    (root / "notebooks").mkdir(parents=True)
    (root / "figures").symlink_to(REPOSITORY / "figures", target_is_directory=True)
    _write_settings(base / "settings")
    env = dict(os.environ)
    env.pop("MPLBACKEND", None)  # a headless Agg backend would keep figures out of the outputs
    env.update(
        PKM_REF_PROFILE="smoke",
        JUPYTER_CONFIG_DIR=str(base / "config"),  # none of the user's server or lab config
        JUPYTER_RUNTIME_DIR=str(base / "runtime"),
        IPYTHONDIR=str(base / "ipython"),  # nor the user's IPython start-up files
    )
    port, token = _free_port(), os.urandom(16).hex()
    command = [
        sys.executable,
        "-m",
        "jupyterlab",
        "--no-browser",
        "--ip=127.0.0.1",
        f"--port={port}",
        "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={root}",
        f"--LabApp.user_settings_dir={base / 'settings'}",
        f"--LabApp.workspaces_dir={base / 'workspaces'}",
        "--LabApp.expose_app_in_browser=True",  # window.jupyterapp: kernel and cell states
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        command.append("--allow-root")
    server = LabServer(f"http://127.0.0.1:{port}", token, root, base / "jupyterlab.log")
    with server.log.open("w") as log:
        process = subprocess.Popen(
            command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        _wait_until_serving(server, process)
        yield server
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # the server and the kernels it started
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="session")
def browser_context(browser_available, tmp_path_factory):
    """A headless Debian Chromium with a fresh profile; requests leaving 127.0.0.1 get an empty
    answer (the Colab badges: no network in CI, and no failed-load errors in the console)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1400, "height": 1400},  # a whole widget with its figure in view
        )
        context.route(
            lambda url: not url.startswith("http://127.0.0.1:"),
            lambda route: route.fulfill(
                status=200,
                content_type="image/svg+xml",
                body="<svg xmlns='http://www.w3.org/2000/svg'/>",
            ),
        )
        try:
            yield context
        finally:
            context.close()


@pytest.fixture(scope="session")
def failure_screenshots(tmp_path_factory) -> Path:
    """Where screenshots of failing cells go (printed by the test that saves one)."""
    return tmp_path_factory.mktemp("browser-failures")
