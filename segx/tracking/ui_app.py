"""MLflow's own tracking-server app with one change for people who train models: a browser that
has never chosen a workflow in MLflow's sidebar opens experiments on their runs table, not on the
GenAI overview (traces, token usage, a "detect issues" pop-up).

MLflow 3.17's UI decides that page from the browser alone: ``?workflowType=`` in the URL, else
localStorage ``mlflow.workflowType_v1`` (written by the sidebar's "GenAI / Model training"
switch), else ``"genai"``. It never reads the experiment's ``mlflow.experimentKind`` tag for it,
and the server has no setting (tests/test_ui_browser.py shows both in Chromium). So the index page
this app serves stores ``"machine_learning"`` there when, and only when, nothing is stored yet: a
user who picks "GenAI" in the sidebar keeps that choice.

    mlflow ui --app-name segx ...        (make ui)
    mlflow server --app-name segx ...    (segx.server)

registered as the ``mlflow.app`` entry point ``segx`` in pyproject.toml.
"""

from __future__ import annotations

from mlflow.server.fastapi_app import app
from starlette.requests import Request
from starlette.responses import Response

WORKFLOW_KEY = "mlflow.workflowType_v1"  # MLflow's useLocalStorage key: f"{key}_v{version}"
DEFAULT_WORKFLOW = "machine_learning"
_SCRIPT = (
    f"<script>try{{if(localStorage.getItem('{WORKFLOW_KEY}')===null)"
    f"localStorage.setItem('{WORKFLOW_KEY}',JSON.stringify('{DEFAULT_WORKFLOW}'))}}catch(e){{}}</script>"
).encode()


def with_default_workflow(html: bytes) -> bytes:
    """The UI's index page with the default set before MLflow's own scripts run."""
    return html.replace(b"<head>", b"<head>" + _SCRIPT, 1) if _SCRIPT not in html else html


@app.middleware("http")
async def _default_workflow(request: Request, call_next):
    response = await call_next(request)
    path = request.url.path
    if not (path.endswith("/") or path.endswith("/index.html")) or "text/html" not in response.headers.get(
        "content-type", ""
    ):
        return response
    body = b"".join([chunk async for chunk in response.body_iterator])
    headers = {k: v for k, v in response.headers.items() if k.lower() != "content-length"}
    return Response(with_default_workflow(body), status_code=response.status_code, headers=headers)


__all__ = ["app", "with_default_workflow"]
