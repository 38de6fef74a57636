"""What produced a run, and the command that reproduces it.

python -m segx.info run_id=<id>
"""

from __future__ import annotations

import json
import os
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
        lines.append(
            f"  member: backbone {tags.get('segx.backbone')}  arch {tags.get('segx.arch')}  "
            f"val/dice {run.data.metrics.get('val/dice', float('nan')):.4f} (whole images, own size), best epoch "
            f"{run.data.metrics.get('curves/best_epoch', float('nan')):.0f}"
        )
        if params:
            from segx.ensembling.members import view_of
            from segx.inference.view import View

            lines.append(
                f"  sees images: {View.from_dict(view_of(params)).describe()}; scored at each image's own size"
            )
    if tags.get("segx.role") == "ensemble":
        lines.extend(_ensemble_lines(client, run))
        if tags.get("segx.pyfunc_uri"):
            lines.append(
                f"  pyfunc model: {tags['segx.pyfunc_uri']} (serve: mlflow models serve -m {tags['segx.pyfunc_uri']} "
                "--env-manager local -p 5002)"
            )
        lines.extend(_exports(client, run_id, tags))
    if tags.get("segx.role") == "export":
        params = run.data.params
        lines.append(
            f"  export ({params.get('format', '?')}, opset {params.get('opset', '-')}, tta {params.get('tta', '?')}) "
            f"of ensemble {tags.get('segx.ensemble_run_id', '?')}: files in artifact 'export/'"
        )
    if tags.get("segx.failure"):
        lines.append(f"  failure: {tags['segx.failure']}")
    if tags.get("segx.command"):
        lines.append(f"  command as typed: {tags['segx.command']}")
    lines.extend(_reproduce_lines(tags, params))
    return "\n".join(lines)


def _reproduce_lines(tags: dict, params: dict) -> list[str]:
    """The command that rebuilds the run's config (members: ``segx.train``, whose ``--cfg job``
    shows the recorded config; ensembles: ``segx.ensemble`` over the same member runs)."""
    role = tags.get("segx.role")
    command = tags.get("segx.reproduce")
    if command:
        what = (
            "the same config (check: add --cfg job)"
            if role == "member"
            else "the same search over the same member runs"
        )
        head = (
            f"  reproduce ({what}; resolved config: config.yaml artifact):"
            if role == "member"
            else f"  reproduce ({what}):"
        )
    elif role == "member" and tags.get("segx.overrides"):  # recorded by segx before 0.3: the job's own overrides
        command = "python -m segx.train " + " ".join(shlex.quote(o) for o in json.loads(tags["segx.overrides"]))
        head = "  reproduce (this job's overrides as Hydra recorded them; resolved config: config.yaml artifact):"
    elif role == "member" and params:  # a run started from Python (no Hydra job): the main keys only
        keys = (
            "data.kind",
            "data.root",
            "data.mode",
            "data.image_size",
            "data.patch_size",
            "data.scale",
            "data.overlap",
            "data.split_seed",
            "data.val_fraction",
            "data.test_fraction",
            "backbone.name",
            "arch.name",
            "trainer.epochs",
            "trainer.batch_size",
            "seed",
        )
        overrides = [f"data={params.get('data.kind', 'synthetic')}", *(f"{k}={params[k]}" for k in keys if k in params)]
        command = "python -m segx.train " + " ".join(shlex.quote(o) for o in overrides)
        head = "  reproduce (main keys only: started outside a Hydra job; full config: config.yaml artifact):"
    else:
        return []
    sha = tags.get("segx.git_sha", "")
    return [head, *([f"    git checkout {sha}"] if sha and sha != "unknown" else []), f"    {command}"]


def _ensemble_lines(client, run) -> list[str]:
    """Members by name with their weights, the threshold, validation and test Dice of each
    member and of the ensemble, and the gain over the best member with its interval."""
    import tempfile

    import pandas as pd

    from segx import tracking

    params, metrics = run.data.params, run.data.metrics
    weights = {}  # label -> weight, in member order (params chosen.weight.<i>.<label>)
    for key, value in params.items():
        if key.startswith("chosen.weight."):
            index, label = key.removeprefix("chosen.weight.").split(".", 1)
            weights[int(index)] = (label, float(value))
    run_ids = {int(k.split(".")[1]): v for k, v in params.items() if k.startswith("member.") and k.endswith(".run_id")}
    tables = {}
    with tempfile.TemporaryDirectory(prefix="segx-info-") as tmp:
        for name in ("val_summary", "test_summary", "gain"):
            try:
                tables[name] = pd.read_csv(tracking.download(client, run.info.run_id, f"tables/{name}.csv", tmp))
            except SegxError:
                tables[name] = None
    val = tables["val_summary"].set_index("method")["val_dice"] if tables["val_summary"] is not None else {}
    test = (
        tables["test_summary"].set_index(tables["test_summary"].columns[0])["dice_mean"]
        if tables["test_summary"] is not None
        else {}
    )
    regions = {k.removeprefix("chosen.threshold."): v for k, v in params.items() if k.startswith("chosen.threshold.")}
    per_class = {
        k.removeprefix("chosen.postprocess."): v for k, v in params.items() if k.startswith("chosen.postprocess.")
    }
    if "chosen.classes" in params:  # several classes: argmax (or a threshold per region), post-processing per class
        how = (
            "thresholds " + ", ".join(f"{r}={t}" for r, t in regions.items())
            if regions
            else f"labels by argmax of {params['chosen.classes'].replace(',', ', ')}"
        )
        post = ", ".join(f"{c}: {p}" for c, p in per_class.items()) or "none"
        lines = [
            f"  {len(weights)} members (weight, validation and test foreground-mean Dice; {how}, post-processing {post}):"
        ]
    else:
        lines = [
            f"  {len(weights)} members (weight, validation Dice at its own threshold, test Dice at 0.5; "
            f"threshold {params.get('chosen.threshold', '?')}, post-processing {params.get('chosen.postprocess', '?')}):"
        ]
    for i in sorted(weights):
        label, weight = weights[i]
        lines.append(
            f"    {label:<28} {run_ids.get(i, '?'):<34} weight {weight:<8.4g} val {_f(val, 'member:' + label)}  "
            f"test {_f(test, 'member:' + label)}"
        )
    lines.append(
        f"    {'ensemble (' + params.get('chosen.method', '?') + ')':<63} {'':<15} "
        f"val {_num(metrics.get('val/dice'))}  test {_num(metrics.get('test/dice'))}"
    )
    gain = tables["gain"].iloc[0].to_dict() if tables["gain"] is not None else None
    if gain:
        lines.append(
            f"  ensemble minus best member ({gain['best_member']}), test Dice: {gain['diff']:+.4f} "
            f"[95% CI {gain['low']:+.4f}, {gain['high']:+.4f}] over {int(gain['cases'])} cases"
        )
    return lines


def _num(value) -> str:
    return "   -  " if value is None or value != value else f"{value:.4f}"


def _f(table, key: str) -> str:
    return _num(table.get(key) if hasattr(table, "get") else None)


def _exports(client, run_id: str, tags: dict) -> list[str]:
    """One line per export of an ensemble (the child runs its ``segx.export.<format>`` tags name)."""
    from segx import tracking

    lines = []
    for key in sorted(k for k in tags if k.startswith("segx.export.")):
        fmt, child = key.removeprefix("segx.export."), tags[key]
        try:
            run = tracking.get_run(client, child, need_finished=False)
            metrics, params = run.data.metrics, run.data.params
            what = f"{run.info.status}, {metrics.get('export/size_mb', float('nan')):.1f} MB" + (
                f", opset {params['opset']}" if params.get("opset", "None") != "None" else ""
            )
        except SegxError as exc:
            what = f"unusable: {exc}"
        lines.append(f"  export {fmt}: run {child} ({what}); predict with backend={fmt}")
    return lines or ["  exports: none (python -m segx.export ensemble_run_id=" + run_id + " format=onnx|savedmodel)"]


USAGE = "usage: python -m segx.info run_id=<id> [paths.output_dir=DIR] [mlflow.tracking_uri=URI]"
KEYS = ("run_id", "paths.output_dir", "mlflow.tracking_uri")
HELP = f"""segx.info: what produced an MLflow run (member, ensemble or export), and the command that reproduces it

{USAGE}

  run_id=<id>               the run (printed by segx.train and segx.ensemble; the MLflow UI's run page)
  paths.output_dir=DIR      where the other commands wrote (default outputs): the store is DIR/mlflow.db
  mlflow.tracking_uri=URI   the store itself (default sqlite:///<paths.output_dir>/mlflow.db, as segx.train writes it)
  -sc install=SHELL         print a completion script for bash, zsh or fish (-sc uninstall=SHELL removes it)

Reads the store, never writes it."""


def completion(action: str) -> str:
    """``-sc install=bash|zsh|fish`` (or ``uninstall=``): the script that completes segx-info's
    keys, as the Hydra commands' ``-sc`` prints theirs (``eval "$(segx-info -sc install=bash)"``)."""
    what, _, shell = action.partition("=")
    words = " ".join(f"{k}=" for k in KEYS) + " --help"
    scripts = {
        ("install", "bash"): f'complete -o nospace -W "{words}" segx-info',
        ("install", "zsh"): f'autoload -Uz bashcompinit && bashcompinit\ncomplete -o nospace -W "{words}" segx-info',
        ("install", "fish"): f'complete -c segx-info -f -a "{words}"',
        ("uninstall", "bash"): "complete -r segx-info",
        ("uninstall", "zsh"): "complete -r segx-info",
        ("uninstall", "fish"): "complete -c segx-info -e",
    }
    if (what, shell) not in scripts:
        raise SegxError(f"-sc {action}: give install=SHELL or uninstall=SHELL with bash, zsh or fish")
    return scripts[(what, shell)]


def run_info(argv: list[str]) -> None:
    """Print :func:`describe` for the ``run_id=`` given; reads the store, never writes it."""
    if any(a in ("-h", "--help") for a in argv):
        print(HELP)
        return
    for i, arg in enumerate(argv):
        if arg in ("-sc", "--shell-completion") or arg.startswith("--shell-completion="):
            action = arg.partition("=")[2] or (argv[i + 1] if i + 1 < len(argv) else "")
            print(completion(action))
            return
    args = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in KEYS:
            hint = suggest(key, KEYS) if sep else ""
            raise SegxError(f"unknown argument '{arg}';{hint} {USAGE}")
        args[key] = value
    if not args.get("run_id"):
        raise SegxError(USAGE)
    from segx import tracking

    output_dir = args.get("paths.output_dir") or os.environ.get("SEGX_OUTPUT_DIR") or "outputs"  # as conf/paths
    store = args.get("mlflow.tracking_uri") or f"sqlite:///{output_dir}/mlflow.db"
    client = tracking.connect(store, create=False)
    print(describe(client, args["run_id"]))


def main() -> None:
    from segx import cli

    cli.run(lambda: run_info(sys.argv[1:]))


if __name__ == "__main__":
    main()
