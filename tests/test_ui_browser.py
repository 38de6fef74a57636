"""Where the MLflow UI of ``make ui`` really lands, checked in headless Chromium over the DevTools
protocol, with real mouse clicks.

MLflow 3.17.2's UI picks the page an experiment opens on from a per-browser "workflow type", not
from the experiment: ``?workflowType=`` in the URL, else localStorage ``mlflow.workflowType_v1``
(set by the sidebar's "GenAI / Model training" switch), else "genai"; it never reads the
``mlflow.experimentKind`` tag for it. ``make ui`` therefore serves MLflow's app through
``--app-name segx`` (segx/tracking/ui_app.py), which stores "machine_learning" when the browser
has no choice yet: a click from the experiments list in a fresh browser opens the runs table, and
a user who switches to GenAI keeps GenAI.

Everything binds 127.0.0.1; the server and each browser are this test's own process groups,
stopped in ``finally``; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from segx import tracking

CHROMIUM = next(
    (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")) if p), None
)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="needs a Chromium/Chrome binary on PATH (apt-get install chromium)"
)
aiohttp = pytest.importorskip("aiohttp", reason="aiohttp (an MLflow dependency) drives the DevTools websocket")

NAME = "segx-ui-browser"
LIST_LINK = (
    "[...document.querySelectorAll('a[data-testid=experiment-list-item-link]')]"
    f".find(a => a.textContent.trim() === {json.dumps(NAME)})"
)
GENAI_SWITCH = "[...document.querySelectorAll('*')].find(e => !e.children.length && e.textContent.trim() === 'GenAI')"
WORKFLOW_KEY = "mlflow.workflowType_v1"  # MLflow's useLocalStorage key: f"{key}_v{version}"


# ---------------------------------------------------------------------------------------------
# the server: an SQLite store with one segx experiment (made by segx's own code) holding a run


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop_group(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM to the process group this test started, SIGKILL what is left after ``timeout``."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)
    time.sleep(0.2)  # its children (uvicorn, the job runner) leave with the group
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    root = tmp_path_factory.mktemp("ui_browser")
    uri = f"sqlite:///{root}/mlflow.db"
    client = tracking.connect(uri)
    exp = tracking.experiment_id(client, NAME, str(root / "artifacts"))  # what every segx command calls
    assert client.get_experiment(exp).tags["mlflow.experimentKind"] == tracking.EXPERIMENT_KIND["mlflow.experimentKind"]
    run = client.create_run(exp, run_name="member-resnet18")
    for step in range(3):
        client.log_metric(run.info.run_id, "val_iou", 0.5 + 0.1 * step, step=step)
    client.set_terminated(run.info.run_id)
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    # `mlflow ui` starts `uvicorn` by name: the venv's bin folder must be on PATH.
    env = dict(
        os.environ,
        PYTHONUNBUFFERED="1",
        PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    )
    log = open(root / "ui.log", "w")  # noqa: SIM115 - closed in finally
    # As `make ui` starts it (Makefile): MLflow's app through segx's, one worker.
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "ui",
            "--app-name",
            "segx",
            "--backend-store-uri",
            uri,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        cwd=root,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (root / "ui.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "mlflow ui did not answer /health in 120 s"
            time.sleep(0.5)
        yield {"base": base, "uri": uri, "experiment_id": exp, "root": root}
    finally:
        _stop_group(server)
        log.close()


# ---------------------------------------------------------------------------------------------
# a minimal DevTools client (aiohttp's websocket), one fresh browser profile per test


class _Page:
    def __init__(self, ws):
        self.ws, self.n = ws, 0

    async def send(self, method: str, **params):
        self.n += 1
        await self.ws.send_json({"id": self.n, "method": method, "params": params})
        while True:
            msg = await asyncio.wait_for(self.ws.receive(), 20)
            if msg.type != aiohttp.WSMsgType.TEXT:
                raise RuntimeError(f"DevTools socket closed during {method}: {msg}")
            data = json.loads(msg.data)
            if data.get("id") == self.n:
                if "error" in data:
                    raise RuntimeError(f"{method}: {data['error']}")
                return data.get("result", {})

    async def js(self, expression: str):
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, what: str, timeout: float = 30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = await self.js(expression)
            if value:
                return value
            await asyncio.sleep(0.25)
        raise TimeoutError(f"{what} not seen in {timeout:.0f} s; page at {await self.js('location.href')}")

    async def click(self, element: str, what: str) -> None:
        """A real mouse click (press and release) at the middle of ``element`` (a JS expression)."""
        x, y = await self.wait_for(
            f"(() => {{ const e = {element}; if (!e) return null; e.scrollIntoView({{block: 'center'}});"
            " const r = e.getBoundingClientRect(); return r.width ? [r.x + r.width / 2, r.y + r.height / 2] : null; })()",
            what,
        )
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            await self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    async def landing(self, experiment_id: str) -> dict:
        """Where the bare ``#/experiments/<id>`` route redirects to, once it has."""
        await self.wait_for(f"/#\\/experiments\\/{experiment_id}\\/[a-z]/.test(location.hash)", "the redirect to a tab")
        await asyncio.sleep(1.5)  # let the tab render its header
        return {
            "href": await self.js("location.href"),
            "heading": await self.js("(document.querySelector('h2') || {}).textContent || ''"),
            "stored": await self.js(f"localStorage.getItem({json.dumps(WORKFLOW_KEY)})"),
        }

    async def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode((await self.send("Page.captureScreenshot", format="png"))["data"]))


def _browse(script, shots: Path, timeout: float = 120):
    """Run ``script(page)`` in a fresh headless Chromium profile (127.0.0.1 DevTools port)."""
    profile = tempfile.mkdtemp(prefix="segx-chromium-")
    env = dict(os.environ, HOME=profile, XDG_CONFIG_HOME=profile, XDG_CACHE_HOME=profile)
    browser = subprocess.Popen(
        [
            CHROMIUM,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--no-default-browser-check",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
            f"--user-data-dir={profile}",
            "--window-size=1400,900",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )
    try:
        port_file = Path(profile) / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().split()):
            assert browser.poll() is None, "chromium exited before opening its DevTools port"
            assert time.monotonic() < deadline, "chromium did not open its DevTools port in 30 s"
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as response:
            target = next(t for t in json.load(response) if t["type"] == "page")

        async def main():
            async with (
                aiohttp.ClientSession() as session,
                session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws,
            ):
                page = _Page(ws)
                await page.send("Page.enable")
                await page.send("Runtime.enable")
                try:
                    return await script(page)
                finally:
                    with contextlib.suppress(Exception):
                        await page.screenshot(shots)

        return asyncio.run(asyncio.wait_for(main(), timeout))
    finally:
        _stop_group(browser, timeout=10)
        shutil.rmtree(profile, ignore_errors=True)


def _assert_runs_table(seen: dict, experiment_id: str) -> None:
    assert re.search(rf"#/experiments/{experiment_id}/runs\?", seen["href"]), seen
    assert "workflowType=machine_learning" in seen["href"] and "overview" not in seen["href"], seen
    assert seen["heading"] == "Runs", seen


# ---------------------------------------------------------------------------------------------
# the tests


def test_the_url_segx_prints_opens_the_runs_table(ui):
    (line,) = [s for s in tracking.ui_urls(ui["uri"], ui["base"]).splitlines() if s.strip().startswith(f"{NAME}:")]
    url = line.split(": ", 1)[1]

    async def script(page):
        await page.send("Page.navigate", url=url)
        return await page.landing(ui["experiment_id"])

    _assert_runs_table(_browse(script, ui["root"] / "printed_url.png"), ui["experiment_id"])


def test_a_list_click_in_a_fresh_browser_opens_the_runs_table(ui):
    async def script(page):
        await page.send("Page.navigate", url=f"{ui['base']}/#/experiments")
        await page.click(LIST_LINK, f"the experiments list's link to {NAME}")
        return await page.landing(ui["experiment_id"])

    seen = _browse(script, ui["root"] / "list_click_fresh.png")
    _assert_runs_table(seen, ui["experiment_id"])
    assert seen["stored"] == '"machine_learning"'


def test_a_user_who_switches_to_genai_keeps_genai(ui):
    async def script(page):
        await page.send("Page.navigate", url=f"{ui['base']}/#/experiments")
        await page.click(GENAI_SWITCH, "the sidebar's 'GenAI' switch")
        await page.wait_for(f"localStorage.getItem({json.dumps(WORKFLOW_KEY)}) === '\"genai\"'", "the stored workflow")
        await page.send("Page.reload")  # the index page again: segx's default must not overwrite the choice
        await page.click(LIST_LINK, f"the experiments list's link to {NAME}")
        return await page.landing(ui["experiment_id"])

    seen = _browse(script, ui["root"] / "list_click_genai.png")
    assert "workflowType=genai" in seen["href"] and "/runs" not in seen["href"], seen
    assert seen["stored"] == '"genai"'
