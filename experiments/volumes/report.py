"""RESULTS.md from results.json: every script of experiments/volumes/ calls :func:`render` after it
writes its section; ``python experiments/volumes/report.py`` rewrites the file alone. Every figure
in it is read from results.json; the sentences that compare figures are written from them here."""

from __future__ import annotations

import statistics
from pathlib import Path

from segx.benchmark.helpers import read_results, spread, write_results

HERE = Path(__file__).resolve().parent
NOTES = HERE / "NOTES.md"  # hand-written remarks (no figures), appended to the report


def _load(values) -> str:
    return "/".join(f"{v:.1f}" for v in values[:1]) if values else "-"


def _machine(results: dict) -> list[str]:
    m = results.get("machine", {})
    return [
        f"Machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores, {m.get('memory_gib', '?')} GiB, "
        f"Python {m.get('python', '?')}; no GPU. The 2 cores were shared with other sessions' test suites "
        "running at the same time (the 1-minute load average at the start and end of each command is in the "
        "tables, and it was often 4 or more): wall times are those of a busy machine and vary run to run; "
        "the ratios below were measured side by side, alternating, for that reason.",
        "",
    ]


def _total(s: dict | None) -> list[str]:
    if not s:
        return []
    parts = ", ".join(f"{k} {v / 60:.1f}" for k, v in s["parts_s"].items())
    return [
        f"The whole benchmark (`python experiments/volumes/run_all.py {s['command']}`) took "
        f"{s['total_s'] / 60:.1f} min ({parts} min){' with its --quick sizes' if s['quick'] else ''}.",
        "",
    ]


def _key(command: str, mode: str, volumes: int) -> str:
    return f"{command.split('.')[-1]} {mode} {volumes}" if mode != "-" else f"{command.split('.')[-1]} {volumes}"


def _memory_runs(s: dict) -> list[dict]:
    """Peak RSS per configuration, for every earlier run (``history``) and this one, last."""
    runs = []
    for h in s.get("history", []):
        run = {}
        for k, v in h.get("train", {}).items():
            mode, volumes = k.split("-")
            run[_key("segx.train", mode, int(volumes))] = v
        for k, v in h.get("predict", {}).items():
            run[_key("segx.predict", "-", int(k))] = v
        for k, v in h.get("deep", {}).items():
            run[f"predict one scan, {k} slices"] = v
        runs.append(run)
    run = {_key("segx.train", r["mode"], r["volumes"]): r["peak_rss_mib"] for r in s.get("train", [])}
    run.update({_key("segx.predict", "-", r["volumes"]): r["peak_rss_mib"] for r in s.get("predict", [])})
    run.update({f"predict one scan, {r['depth']} slices": r["peak_rss_mib"] for r in s.get("deep", [])})
    runs.append(run)
    return runs


def _range(runs: list[dict], key: str) -> float:
    values = [r[key] for r in runs if key in r]
    return max(values) - min(values) if len(values) > 1 else 0.0


def _memory(s: dict) -> list[str]:
    out = [
        "## 1. Memory flat from 10 to 100 volumes",
        "",
        f"`experiments/volumes/memory.py`: `data=synthetic_volumes`, volumes of {s['side']} x {s['side']} x "
        f"{s['depth']} voxels (0.8 x 0.8 x 3 mm); every size has the same 2 validation and 2 test volumes, so only "
        "the training set grows. Each command in its own process, from an empty output folder; peak RSS is the "
        "child's `ru_maxrss` (`os.wait4`). Training: one resnet18 Unet, 1 epoch, batch 8, `augment=none` (resize: "
        "every training slice at 64 px, so the epoch grows with N; patch: 32 px patches, 64 per epoch at every N). "
        "Prediction: `segx.predict` (batch 8, masks and uncertainty volumes) with a one-member ensemble of the "
        "10-volume resize member, on the first 10 and on all 100 scans.",
        "",
        "| command | mode | volumes (train) | slices | peak RSS MiB | wall s | load start/end |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in s.get("train", []):
        out.append(
            f"| segx.train | {r['mode']} | {r['volumes']} ({r['train_volumes']}) | {r['slices']} | "
            f"{r['peak_rss_mib']:.0f} | {r['wall_s']:.1f} | {r['load_start'][0]:.1f}/{r['load_end'][0]:.1f} |"
        )
    for r in s.get("predict", []):
        out.append(
            f"| segx.predict | - | {r['volumes']} | {r['slices']} | {r['peak_rss_mib']:.0f} | {r['wall_s']:.1f} | "
            f"{r['load_start'][0]:.1f}/{r['load_end'][0]:.1f} |"
        )
    out += ["", "Peak RSS, largest against smallest number of volumes:", ""]
    out += ["| command | mode | smallest | largest | ratio | difference MiB |", "|---|---|---|---|---|---|"]
    pairs = []
    for mode in s.get("modes", []):
        rows = sorted((r for r in s.get("train", []) if r["mode"] == mode), key=lambda r: r["volumes"])
        if len(rows) >= 2:
            pairs.append(("segx.train", mode, rows[0], rows[-1]))
    rows = sorted(s.get("predict", []), key=lambda r: r["volumes"])
    if len(rows) >= 2:
        pairs.append(("segx.predict", "-", rows[0], rows[-1]))
    for command, mode, a, b in pairs:
        ratio = b["peak_rss_mib"] / a["peak_rss_mib"]
        out.append(
            f"| {command} | {mode} | {a['peak_rss_mib']:.0f} ({a['volumes']}) | {b['peak_rss_mib']:.0f} "
            f"({b['volumes']}) | {ratio:.3f} | {b['peak_rss_mib'] - a['peak_rss_mib']:+.0f} |"
        )
    out.append("")
    runs = _memory_runs(s)
    if len(runs) > 1:
        keys = list(dict.fromkeys(k for r in runs for k in r))
        out += [
            f"The same configurations in every run of memory.py so far ({len(runs)} runs, this one last; peak RSS MiB):",
            "",
            "| configuration | " + " | ".join(f"run {i + 1}" for i in range(len(runs))) + " | largest - smallest |",
            "|---|" + "---|" * (len(runs) + 1),
        ]
        for k in keys:
            values = [r.get(k) for r in runs]
            known = [v for v in values if v is not None]
            out.append(
                f"| {k} | "
                + " | ".join("-" if v is None else f"{v:.0f}" for v in values)
                + (f" | {max(known) - min(known):.0f} |" if len(known) > 1 else " | - |")
            )
        out.append("")
    for command, mode, a, b in pairs:
        ratio = b["peak_rss_mib"] / a["peak_rss_mib"]
        diff = b["peak_rss_mib"] - a["peak_rss_mib"]
        keys = [_key(command, mode, a["volumes"]), _key(command, mode, b["volumes"])]
        noise = max((_range(runs, k) for k in keys), default=0.0)
        if ratio <= 1.05:
            verdict = "flat (within 5%)"
        elif noise and abs(diff) <= noise:
            verdict = (
                f"more than 5%, but the same configuration varied by up to {noise:.0f} MiB from run to run, so the "
                "difference is within what repeating a run gives"
            )
        else:
            verdict = "not flat (more than 5% higher, beyond the run-to-run spread seen)"
        held = ""
        if mode == "resize":
            small, large = (r["slices"] * 64 * 64 * 4 / 2**20 for r in (a, b))
            held = (
                f" Resize mode keeps every slice at the model's size in memory by design (`_model_size_dataset`, "
                f"`segx/workflows/prepare.py`: slices x 64 x 64 x (3 + 1) bytes = {small:.1f} and {large:.1f} MiB), "
                "and its epoch grows with N."
            )
        out.append(
            f"- {command}{'' if mode == '-' else f' ({mode})'}: {b['volumes'] // a['volumes']}x the volumes, peak "
            f"RSS x{ratio:.3f} ({diff:+.0f} MiB): {verdict}.{held}"
        )
    out.append("")
    deep = sorted(s.get("deep", []), key=lambda r: r["depth"])
    if deep:
        out += [
            "One scan, growing depth (the same one-member ensemble; `segx.predict`, batch 8, masks and uncertainty). "
            "The issue asks that inference memory follow a batch of slices, not the volume:",
            "",
            "| scan voxels | slices | peak RSS MiB | wall s |",
            "|---|---|---|---|",
            *(
                f"| {r['side']} x {r['side']} x {r['depth']} | {r['depth']} | {r['peak_rss_mib']:.0f} | "
                f"{r['wall_s']:.1f} |"
                for r in deep
            ),
            "",
        ]
        if len(deep) >= 2:
            a, b = deep[0], deep[-1]
            grow = b["peak_rss_mib"] - a["peak_rss_mib"]
            per = grow / ((b["voxels"] - a["voxels"]) / 1e6)
            follows = b["peak_rss_mib"] > 1.05 * a["peak_rss_mib"]
            verdict = "memory follows the volume, not a batch" if follows else "within 5%: memory follows a batch"
            why = (
                " This is what the code says: `predict_volume` (`segx/inference/volume_folder.py`) builds every "
                "slice of the volume before it predicts (`[sliced.image(i) for i in range(sliced.n)]`), and "
                "`EnsemblePredictor.predict_slices` (`segx/inference/predictor.py`) holds every member's "
                "probabilities of the whole volume to decide it as one case, then the float32 mean probabilities and "
                "uncertainty of the volume are made."
                if follows
                else ""
            )
            out += [
                f"- {b['depth'] // a['depth']}x the slices: peak RSS x{b['peak_rss_mib'] / a['peak_rss_mib']:.3f} "
                f"({grow:+.0f} MiB, {per:.0f} MiB per million voxels): {verdict}.{why}",
                "",
            ]
    return out


def _speed(s: dict) -> list[str]:
    t = s["times_s"]
    ratio = s["ratio_median"]
    verdict = (
        "meets the issue's target (at least 0.9)"
        if ratio >= 0.9
        else "misses the issue's target of 0.9: the volume path is the slower one by more than 10%"
    )
    return [
        "## 2. Slice-wise inference against the plain 2D path",
        "",
        f"`experiments/volumes/speed.py`: one process, flow.py's ensemble ({s['members_used']} members with a "
        f"non-zero weight) loaded once; {s['volumes']} scans = {s['slices']} slices of "
        f"{' / '.join('x'.join(map(str, sh[:2])) for sh in s['slice_shapes'])} px, batch {s['batch_size']}, "
        f"{s['repeats']} repeats after one untimed warm-up call of each arm, the volume and 2D arms alternating "
        "which goes first. volume: `predict_volume_folder` on the NIfTI scans; 2D: `predict_folder` on PNGs of "
        "exactly the slices the volume path feeds the members; network: `EnsemblePredictor.predict` on those "
        "slices in memory (no file read or written). Masks only in both paths. Seconds, median (min-max):",
        "",
        "| arm | seconds | per slice ms |",
        "|---|---|---|",
        *(
            f"| {name} | {spread(t[name])} | {1000 * statistics.median(t[name]) / s['slices']:.1f} |"
            for name in ("volume", "2d", "network")
        ),
        "",
        f"**2D time / volume time: {s['ratio_spread']}** (per repeat: "
        f"{', '.join(f'{r:.3f}' for r in s['ratio_2d_over_volume'])}); the median {verdict}. "
        f"Network time / volume time: {spread(s['network_over_volume'], 3)}. Load average {_load(s['load_start'])} "
        f"at the start, {_load(s['load_end'])} at the end.",
        "",
        f"The two paths' labels agree on {100 * s['voxels_equal_fraction']:.4f}% of voxels ({s['volumes_identical']} "
        f"of {s['volumes']} volumes identical). They can differ only where the ensemble's post-processing acts: "
        "the volume path decides each volume as one case (its slices stacked, as the search cached them), the 2D "
        "path each slice alone. The network arm always ran third; it decides each batch of slices on its own, the "
        "volume arm each volume once, and the 2D arm reads and writes one PNG per slice where the volume arm reads "
        "and writes one NIfTI per scan.",
        "",
    ]


def _sides(compare: dict) -> str:
    worse = [m for m, e in compare.items() if e["bootstrap"]["high"] < 0]
    better = [m for m, e in compare.items() if e["bootstrap"]["low"] > 0]
    unclear = [m for m in compare if m not in worse and m not in better]
    parts = []
    if worse:
        parts.append(f"2.5D is worse, the whole interval below 0, for {', '.join(worse)}")
    if better:
        parts.append(f"2.5D is better, the whole interval above 0, for {', '.join(better)}")
    if unclear:
        parts.append(f"the interval includes 0 for {', '.join(unclear)}")
    return "Over all rows: " + "; ".join(parts) + "."


def _context(s: dict) -> list[str]:
    c = s["compare"]
    sp = s["split"]
    out = [
        "## 3. 2D against 2.5D at the same budget, scored in 3D",
        "",
        f"`experiments/volumes/context.py`: {s['cases']} synthetic volumes of {s['side']} x {s['side']} x "
        f"{s['depth']} voxels (generator seed 0), one split file for both arms ({sp['train']} train, {sp['val']} "
        f"validation, {sp['test']} test volumes); per arm, from an empty store, `segx.ensemble "
        f"ensemble.train_missing=true` with members {', '.join(s['members'])} ({s['epochs']} epochs each, batch 8, "
        "augment=light, seed 42) and `data.context_slices=0` (2D) or `1` (2.5D: the slice either side as channels). "
        "Score: each test volume's 3D Dice, foreground mean of liver and both kidneys; difference 2.5D - 2D with "
        "the paired bootstrap over test volumes (2000 resamples, 95% interval). Wall time of each arm: "
        + ", ".join(f"{k} {v['wall_s']:.0f} s" for k, v in s["arms"].items())
        + ".",
        "",
        "| method | 2D Dice | 2.5D Dice | 2.5D - 2D [95% interval] | share of resamples 2.5D not better | "
        "HD95 mm 2D / 2.5D | NSD 2D / 2.5D |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, e in c.items():
        b = e["bootstrap"]
        out.append(
            f"| {method} | {e['dice_2d']:.4f} | {e['dice_2.5d']:.4f} | {b['diff']:+.4f} [{b['low']:+.4f}, "
            f"{b['high']:+.4f}] | {b['p_not_better']:.3f} | {e['hd95_2d']:.2f} / {e['hd95_2.5d']:.2f} | "
            f"{e['nsd_2d']:.4f} / {e['nsd_2.5d']:.4f} |"
        )
    ens = c.get("ensemble")
    if ens:
        out += ["", "Ensemble, 3D Dice per class (mean over test volumes):", ""]
        out += ["| class | 2D | 2.5D |", "|---|---|---|"]
        out += [f"| {k} | {v['2d']:.4f} | {v['2.5d']:.4f} |" for k, v in ens["per_class"].items()]
        b = ens["bootstrap"]
        if b["low"] > 0:
            verdict = "2.5D is better on these volumes: the interval lies above 0"
        elif b["high"] < 0:
            verdict = "2.5D is worse on these volumes: the interval lies below 0"
        else:
            verdict = "the interval includes 0: on these volumes the data cannot tell the two apart"
        out += [
            "",
            f"The ensemble's difference is {b['diff']:+.4f} [{b['low']:+.4f}, {b['high']:+.4f}] over {b['cases']} "
            f"test volumes: {verdict}. "
            + _sides(c)
            + " This is one seed of one synthetic generator (ellipsoid organs, noise), "
            f"{sp['test']} test volumes and {s['epochs']} epochs: it supports no general claim about 2.5D input, "
            "only about this setting.",
        ]
    hist = s.get("history", [])
    if hist:
        out += [
            "",
            "Earlier runs of context.py (the same script; what differed is in the columns), ensemble row:",
            "",
            "| run finished | split train/val/test | epochs | 2D Dice | 2.5D Dice | 2.5D - 2D [95% interval] |",
            "|---|---|---|---|---|---|",
        ]
        for h in [*hist, {**s, "finished": s.get("finished")}]:
            e, sp_ = h["compare"].get("ensemble"), h.get("split") or {}
            if e is None:
                continue
            b = e["bootstrap"]
            out.append(
                f"| {h.get('finished') or '?'} | {sp_.get('train', '?')}/{sp_.get('val', '?')}/{sp_.get('test', '?')} | "
                f"{h.get('epochs', '?')} | {e['dice_2d']:.4f} | {e['dice_2.5d']:.4f} | {b['diff']:+.4f} "
                f"[{b['low']:+.4f}, {b['high']:+.4f}] |"
            )
        signs = {(h["compare"]["ensemble"]["bootstrap"]["diff"] > 0) for h in [*hist, s] if "ensemble" in h["compare"]}
        if len(signs) > 1:
            out += [
                "",
                "The sign of the ensemble's difference changed between these runs, whose settings differ only as "
                "the columns show (same generator seed, members, batch and training seed): a reason more to read "
                "none of them as a property of 2.5D input.",
            ]
    out.append("")
    return out


def _flow(s: dict) -> list[str]:
    e, p = s["ensemble"], s["predict"]
    written = s["written"]
    ok = all(w["affine_equal"] and w["shape_equal"] for w in written)
    out = [
        "## 4. The flow on `data=synthetic_volumes`, from an empty store",
        "",
        "`experiments/volumes/flow.py`: `python -m segx.ensemble data=synthetic_volumes ensemble.train_missing=true`"
        " (the data config's defaults: 12 volumes of 64 x 64 x 16 voxels; conf/ensemble.yaml's three members "
        "resnet18, mobilenetv2 and efficientnetb0, each with conf/train.yaml's trainer: "
        + ("3 epochs (`--quick`)" if s["quick"] else "15 epochs, early stopping after 8 without gain")
        + ", batch 8, augment=light), then `python -m segx.predict` on the split's test scans. Only `data.root`, "
        "`paths.output_dir` and the MLflow store were pointed at a temporary folder. Stages from the lines segx "
        "prints:",
        "",
        "| stage | seconds |",
        "|---|---|",
        *(f"| {r['stage']} | {r['seconds']:.1f} |" for r in s["stages"]),
        f"| **segx.ensemble, whole command** | **{e['wall_s']:.1f}** |",
        f"| segx.predict, {len(s['test_cases'])} test volumes | {p['wall_s']:.1f} |",
        f"| **both commands** | **{e['wall_s'] + p['wall_s']:.1f}** ({(e['wall_s'] + p['wall_s']) / 60:.1f} min) |",
        "",
        f"Peak RSS: segx.ensemble {e['peak_rss_mib']:.0f} MiB, segx.predict {p['peak_rss_mib']:.0f} MiB. Load "
        f"average at the start and end: {_load(e['load_start'])} / {_load(e['load_end'])} (ensemble), "
        f"{_load(p['load_start'])} / {_load(p['load_end'])} (predict). The written label volumes "
        + (
            "have the scans' affine and shape, every one"
            if ok
            else "do NOT all have the scans' affine and shape (see results.json, flow.written)"
        )
        + f" ({len(written)} checked with nibabel).",
        "",
    ]
    if s.get("printed_report"):
        out += ["What segx.ensemble printed at the end:", "", "```", *s["printed_report"], "```", ""]
    return out


def _mr(s: dict) -> list[str]:
    pieces = s["pieces"]
    names = list(s["dice_numpy"])
    ok = s["affine_equal"] and s["shape_equal"] and s["qform_sform_codes"][0] == s["qform_sform_codes"][1]
    out = [
        "## 5. A real MR volume (functional demo)",
        "",
        "`experiments/volumes/mr_demo.py`: `../shared/datasets/totalseg_mr_example` (117 x 91 x 20 voxels, 3 mm, "
        "L-P-S) cut along z into 4 sub-volumes of 5 slices, an nnU-Net v2 folder in a temporary directory "
        '(channel "MRI"). Kept classes with their own values: spleen 1, kidney_right 2, kidney_left 3, liver 5; '
        f"the other {len(s['dropped_values'])} values ({', '.join(map(str, s['dropped_values']))}) were mapped to "
        "background. The labels are TotalSegmentator's predictions, not manual annotations. Roles fixed by a split "
        f"file; members resnet18 and mobilenetv2, {s['epochs']} epochs, resize mode at {s['image_size']} px.",
        "",
        "| piece | slices | role | " + " | ".join(names) + " |",
        "|---|---|---|" + "---|" * len(names),
    ]
    roles = {"mr_z00": "train", "mr_z15": "train", "mr_z05": "validation", "mr_z10": "test (held out)"}
    for case, p in pieces.items():
        out.append(
            f"| {case} | {p['slices'][0]}-{p['slices'][1]} | {roles.get(case, '?')} | "
            + " | ".join(str(p[n]) for n in names)
            + " |"
        )
    out += [
        "",
        "Held-out piece `mr_z10`, predicted by `segx.predict` and read back with nibabel:",
        "",
        "| class | voxels (labels) | voxels (predicted) | 3D Dice |",
        "|---|---|---|---|",
    ]
    for n in names:
        d = s["dice_numpy"][n]
        out.append(
            f"| {n} | {s['voxels_truth'][n]} | {s['voxels_predicted'][n]} | {'-' if d is None else f'{d:.4f}'} |"
        )
    table = s.get("ensemble_test_per_volume") or {}
    if "dice" in table:
        out += ["", f"The ensemble run's own `tables/test_per_volume.csv` gives the same piece a foreground-mean 3D "
                f"Dice of {table['dice']:.4f}, HD95 {table.get('hd95', float('nan')):.1f} mm, NSD "
                f"{table.get('nsd', float('nan')):.4f}."]  # fmt: skip
    out += [
        "",
        f"Geometry: affine equal {s['affine_equal']}, shape equal {s['shape_equal']}, orientation "
        f"{s['axcodes'][0]} -> {s['axcodes'][1]}, qform/sform codes {s['qform_sform_codes'][0]} -> "
        f"{s['qform_sform_codes'][1]}, written as {s['dtype']} with values {s['label_values_written']}: "
        + ("the label volume overlays its scan." if ok else "the label volume does NOT match its scan's header.")
        + f" segx.ensemble took {s['ensemble']['wall_s']:.0f} s and segx.predict {s['predict']['wall_s']:.0f} s.",
        "",
        "One volume cut into four pieces (two to train on, one to validate, one to test, neighbouring slices of "
        "the same patient) supports no accuracy claim: the Dice figures above show that the flow runs end to end "
        "on a real scan, nothing more.",
        "",
    ]
    return out


def _stacked(s: dict) -> list[str]:
    out = [
        "## Finding: post-processing a volume works on its stacked slices (2D components), not in 3D",
        "",
        "`experiments/volumes/stacked_postprocess.py`. Since 831e37d a volume is one case: its slices are "
        "stacked along rows, (n x h, w), through the search and `EnsemblePredictor.predict_slices` "
        "(`segx/inference/predictor.py`), and the post-processing the search chooses "
        "(`segx/scoring/postprocess.py`, `apply_one`: OpenCV connected components, 8-connected, line 52) runs on "
        "that stacked image. Its components are therefore 2D pieces of single slices, and the last row of one slice "
        "touches the first row of the next (opposite edges of the field of view). On hand-built volumes, against "
        "26-connected 3D components (`scipy.ndimage.label`):",
        "",
        "| volume, post-processing | voxels | kept, stacked (per slice) | kept, 3D components (per slice) |",
        "|---|---|---|---|",
    ]
    for c in s["cases"]:
        out.append(
            f"| {c['case']} | {c['voxels']} | {c['kept_stacked']} ({c['per_slice_stacked']}) | {c['kept_3d']} "
            f"({c['per_slice_3d']}) |"
        )
    out += [
        "",
        "So `keep-largest` on a volume keeps the largest cross-section of one slice, and `remove<N px` counts "
        "pixels of one slice's piece (joined with the neighbouring slice's opposite edge), not voxels of a 3D "
        "object. Search and prediction agree (both stacked), so what is written is what was scored; but the "
        "options do not mean on volumes what their names say, and nnU-Net's keep-largest works on 3D components. "
        "The search would rarely pick keep-largest on volumes (it would lower validation Dice). Not changed here: "
        "it needs a decision (3D components per volume, or post-processing off for volumes).",
        "",
    ]
    return out


def render(results: dict) -> str:
    lines = [
        "# Volumes: memory, inference speed, 2D against 2.5D, the flow, a real MR scan (issue 29)",
        "",
        "Written by the scripts in `experiments/volumes/` (`memory.py`, `speed.py`, `context.py`, `flow.py`, "
        "`mr_demo.py`; `report.py` rewrites this file from `results.json`). Work files went under "
        "`/tmp/segx-volbench`, never into the repository.",
        "",
        *_machine(results),
        *_total(results.get("run_all")),
    ]
    parts = (
        ("memory", _memory),
        ("speed", _speed),
        ("context", _context),
        ("flow", _flow),
        ("mr_demo", _mr),
        ("stacked_postprocess", _stacked),
    )
    for key, part in parts:
        if key in results:
            lines += part(results[key])
        else:
            lines += [f"## {key}: not run yet", ""]
    lines += [
        "## Fixed in segx on this branch (separate commits)",
        "",
        "- `segx/inference/volume_folder.py`, `planned()`: it always listed `ensemble.json` among the files to move "
        "into place, but `predict_volume_folder` writes the record only when one is given, so a call with "
        "`record=None` (as speed.py makes) predicted every volume and then failed with `FileNotFoundError` on "
        "`.segx-partial-*/ensemble.json`. `segx.predict` always passes a record, so the command was not affected.",
        '- `segx/evaluation/report.py`, `print_report`: the test table\'s heading said "HD95 in pixels" for volume '
        "members, whose HD95 there is in mm, in 3D per volume (and for `data.pixel_spacing`, in its units); main "
        "fixed the same heading its own way (9080df9, 3e52431), and the merge of main into this branch kept main's.",
        "",
    ]
    if NOTES.exists():
        lines += [NOTES.read_text().rstrip(), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    write_results(HERE, None, render(read_results(HERE)))
