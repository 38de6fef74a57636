"""What produced a run, and the command that reproduces it.

    python -m segx.info run_id=<id>
"""

from __future__ import annotations

import json
import shlex
import sys

from segx.errors import SegxError, suggest


def describe(client, run_id: str) -> str:
    from segx import tracking

    run = tracking.get_run(client, run_id, need_finished=False)
    tags, params = run.data.tags, run.data.params
    lines = [
        f"run {run_id}  name {run.info.run_name}  status {run.info.status}",
        f"  role: {tags.get('segx.role', '?')}  experiment id: {run.info.experiment_id}",
        f"  segx {tags.get('segx.version', '?')}  git {tags.get('segx.git_sha', '?')}"
        + ("  (uncommitted changes at the time)" if tags.get("segx.git_dirty") == "true" else ""),
        f"  data fingerprint: {tags.get('segx.data_fingerprint', '?')}",
    ]
    versions = {k.removeprefix("segx.pkg."): v for k, v in tags.items() if k.startswith("segx.pkg.")}
    if versions:
        lines.append("  packages: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())))
    if tags.get("segx.role") == "member":
        lines.append(f"  member: backbone {tags.get('segx.backbone')}  arch {tags.get('segx.arch')}  "
                     f"best val/dice {run.data.metrics.get('best/val_dice', float('nan')):.4f}")  # fmt: skip
        if params:
            from segx.ensembling.members import view_of
            from segx.inference.view import View

            lines.append(f"  sees images: {View.from_dict(view_of(params)).describe()}; scored at each image's own size")
    if tags.get("segx.role") == "ensemble":
        lines.append(f"  members: {tags.get('segx.members', '')}")
        if tags.get("segx.pyfunc_uri"):
            lines.append(f"  pyfunc model: {tags['segx.pyfunc_uri']} (serve: mlflow models serve -m {tags['segx.pyfunc_uri']} "
                         "--env-manager local -p 5002)")  # fmt: skip
        lines.extend(_exports(client, run_id, tags))
    if tags.get("segx.role") == "export":
        params = run.data.params
        lines.append(f"  export ({params.get('format', '?')}, opset {params.get('opset', '-')}, tta {params.get('tta', '?')}) "
                     f"of ensemble {tags.get('segx.ensemble_run_id', '?')}: files in artifact 'export/'")  # fmt: skip
    if tags.get("segx.failure"):
        lines.append(f"  failure: {tags['segx.failure']}")
    if tags.get("segx.command"):
        lines.append(f"  command as typed: {tags['segx.command']}")
    if tags.get("segx.role") == "member" and params:
        sha = tags.get("segx.git_sha", "")
        recorded = tags.get("segx.overrides")
        if recorded:  # the job's own overrides, as Hydra recorded them: rebuilds exactly its config
            overrides = json.loads(recorded)
            lines.append("  reproduce (this job's overrides as Hydra recorded them; resolved config: config.yaml artifact):")
        else:  # a run started from Python (no Hydra job): the main keys only
            keys = ("data.kind", "data.root", "data.mode", "data.image_size", "data.patch_size", "data.scale", "data.overlap",
                    "data.split_seed", "data.val_fraction", "data.test_fraction",
                    "backbone.name", "arch.name", "trainer.epochs", "trainer.batch_size", "seed")  # fmt: skip
            overrides = [f"data={params.get('data.kind', 'synthetic')}", *(f"{k}={params[k]}" for k in keys if k in params)]
            lines.append("  reproduce (main keys only: started outside a Hydra job; full config: config.yaml artifact):")
        if sha and sha != "unknown":
            lines.append(f"    git checkout {sha}")
        lines.append("    python -m segx.train " + " ".join(shlex.quote(o) for o in overrides))
    return "\n".join(lines)


def _exports(client, run_id: str, tags: dict) -> list[str]:
    """One line per export of an ensemble (the child runs its ``segx.export.<format>`` tags name)."""
    from segx import tracking

    lines = []
    for key in sorted(k for k in tags if k.startswith("segx.export.")):
        fmt, child = key.removeprefix("segx.export."), tags[key]
        try:
            run = tracking.get_run(client, child, need_finished=False)
            metrics, params = run.data.metrics, run.data.params
            what = (f"{run.info.status}, {metrics.get('export/size_mb', float('nan')):.1f} MB"
                    + (f", opset {params['opset']}" if params.get("opset", "None") != "None" else ""))  # fmt: skip
        except SegxError as exc:
            what = f"unusable: {exc}"
        lines.append(f"  export {fmt}: run {child} ({what}); predict with backend={fmt}")
    return lines or ["  exports: none (python -m segx.export ensemble_run_id=" + run_id + " format=onnx|savedmodel)"]


USAGE = "usage: python -m segx.info run_id=<id> [mlflow.tracking_uri=URI]"


def run_info(argv: list[str]) -> None:
    """Print :func:`describe` for the ``run_id=`` given; reads the store, never writes it."""
    args = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in ("run_id", "mlflow.tracking_uri"):
            hint = suggest(key, ["run_id", "mlflow.tracking_uri"]) if sep else ""
            raise SegxError(f"unknown argument '{arg}';{hint} {USAGE}")
        args[key] = value
    if not args.get("run_id"):
        raise SegxError(USAGE)
    from segx import tracking

    client = tracking.connect(args.get("mlflow.tracking_uri", "sqlite:///outputs/mlflow.db"), create=False)
    print(describe(client, args["run_id"]))


def main() -> None:
    from segx import cli

    cli.run(lambda: run_info(sys.argv[1:]))


if __name__ == "__main__":
    main()
