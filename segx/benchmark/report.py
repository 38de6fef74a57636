"""RESULTS.md of the study, rebuilt from whichever stage files exist (a failed stage never
discards the others; a report can be rewritten without rerunning anything)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

ANCHORS = [
    (
        "U-Net, pytorch-nested-unet README",
        "96x96, own split, Lovász loss, from scratch, GPU",
        "IoU 0.839 (Dice ~0.912)",
    ),
    ("UNet++ (deep supervision), same source", "96x96, same setting", "IoU 0.843"),
    ("DoubleU-Net (Jha et al. 2020)", "ImageNet VGG19 encoder, 256x256", "Dice ~0.913 (recalled, unverified)"),
]


def _fmt(v, digits=4):
    return "n/a" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.{digits}f}"


def load_stage(results: Path, stage: str) -> dict | None:
    """A stage's saved results, or None if it has not run (or failed)."""
    path = results / f"{stage}.json"
    return json.loads(path.read_text()) if path.exists() else None


def write_report(results: Path, profile) -> None:
    """RESULTS.md from the stage files present."""
    lines = _header(profile.name, load_stage(results, "machine") or {})
    for stage, section in _SECTIONS:
        saved = load_stage(results, stage)
        if saved:
            lines += section(saved)
    notes = results / "NOTES.md"
    if notes.exists():
        lines += [notes.read_text()]
    (results / "RESULTS.md").write_text("\n".join(lines) + "\n")


def _header(profile_name: str, env: dict) -> list[str]:
    """Title, how to reproduce, and the machine the numbers were measured on (when recorded)."""
    quick = profile_name == "quick"
    lines = [
        f"# DSB2018 nuclei: segx study ({profile_name} profile)",
        "",
        f"Reproduce: `python -m segx.bench{' profile=quick' if quick else ''}` "
        f"(`make bench{'-quick' if quick else ''}`). Data read in place from "
        "`../shared/datasets/dsb2018_nuclei` (664 images; 541 fluorescence, 123 brightfield/H&E).",
        "",
    ]
    if env:
        lines += [
            f"Machine: {env.get('cpu')}, {env.get('cores')} cores; TensorFlow {env.get('tensorflow')}, "
            f"tf-keras {env.get('tf-keras')}, segmentation-models {env.get('segmentation-models')}, numpy {env.get('numpy')}, "
            f"Python {env.get('python')}. Every ratio below was measured within one run, side by side.",
            "",
        ]
    return lines


def _accuracy_section(acc: dict) -> list[str]:
    """Section 1: the members, the test and validation tables, and published anchors."""
    return [
        *_accuracy_intro(acc),
        *_members_table(acc["members"]),
        *_test_table(acc["test_table"], acc["threshold"]),
        *_validation_table(acc["val_table"]),
        *_anchors_table(),
        "",
        "![accuracy](accuracy.png)",
        "",
    ]


def _accuracy_intro(acc: dict) -> list[str]:
    return [
        "## 1. Accuracy (test split, never seen by training or the search)",
        "",
        f"Input {acc['image_size']}x{acc['image_size']} (resized), "
        + (
            "scored at each image's own size against the original masks, "
            if acc.get("scored_at") == "original size"
            else f"scored at the {acc['image_size']} px square against resized masks (segx 0.1), "
        )
        + "random init (no pretraining), "
        "`augment=strong`, split 70/15/15 stratified by appearance (`data.split_seed=0`). "
        f"Ensemble: weights {acc['weights']}, threshold {acc['threshold']}, chosen '{acc['chosen']}', "
        f"post-processing {acc['postprocess']}; ensemble run `{acc['ensemble_run_id']}`.",
        "",
    ]


def _members_table(members: list[dict]) -> list[str]:
    lines = [
        "| members | run | best val Dice | epochs | train time (s) |",
        "|---|---|---|---|---|",
    ]
    for m in members:
        lines.append(
            f"| {m['backbone']} | `{m['run_id'][:8]}` | {_fmt(m['best_val_dice'])} | {m['epochs_run']} | "
            f"{_fmt(m['train_seconds'], 0)} |"
        )
    return lines


def _appearances(test_table: list[dict]) -> list[str]:
    """The image appearances the test rows have a Dice column for (``dice_<appearance>``)."""
    return sorted(
        {
            k.removeprefix("dice_")
            for r in test_table
            for k in r
            if k.startswith("dice_") and k.removeprefix("dice_") not in ("mean", "median", "q25", "q75")
        }
    )


def _test_table(test_table: list[dict], ensemble_threshold) -> list[str]:
    apps = _appearances(test_table)
    # Members, equal weights and majority vote are scored on test at 0.5 (no test-time choice
    # was made for them), the ensemble at its validation-chosen threshold: the column says so.
    head = (
        "| method | threshold | Dice mean | Dice median | Dice IQR | IoU mean | HD95 mean (px) | HD95 median | "
        + " | ".join(f"Dice {a}" for a in apps)
        + " |"
    )
    lines = [
        "Test rows: members, equal weights and majority vote at threshold 0.5; the ensemble at the "
        "threshold chosen on validation (so 'equal-weights' here differs from the validation row "
        "of the same name, which is at its best validation threshold).",
        "",
        head,
        "|" + "---|" * (8 + len(apps)),
    ]
    for r in test_table:
        threshold = ensemble_threshold if r["method"].startswith("ensemble") else 0.5
        lines.append(
            f"| {r['method']} | {threshold} | {_fmt(r['dice_mean'])} | {_fmt(r['dice_median'])} | "
            f"{_fmt(r['dice_q25'], 3)}-{_fmt(r['dice_q75'], 3)} | "
            f"{_fmt(r['iou_mean'])} | {_fmt(r['hd95_mean'], 2)} | {_fmt(r['hd95_median'], 2)} | "
            + " | ".join(f"{_fmt(r.get('dice_' + a))} (n={r.get('n_' + a, 0)})" for a in apps)
            + " |"
        )
    return lines


def _validation_table(val_table: list[dict]) -> list[str]:
    lines = [
        "",
        "Validation (where weights, threshold and post-processing were chosen):",
        "",
        "| method | val Dice | threshold |",
        "|---|---|---|",
    ]
    for r in val_table:
        lines.append(f"| {r['method']} | {_fmt(r['val_dice'])} | {r['threshold']} |")
    return lines


def _anchors_table() -> list[str]:
    return [
        "",
        "Published anchors (different settings, so not like for like):",
        "",
        "| source | setting | figure |",
        "|---|---|---|",
        *(f"| {a} | {b} | {c} |" for a, b, c in ANCHORS),
    ]


def _throughput_section(thr: dict) -> list[str]:
    """Section 2: training through the real input pipeline against tensors held in memory."""
    lines = [
        "## 2. Training throughput: real input pipeline vs tensors already in memory",
        "",
        f"Same model, same step; the pipeline decodes nothing (images are held in memory at model size) but runs "
        f"`augment={thr['augment']}` and the encoder's preprocessing in tf.data worker threads. Median of 3 "
        f"alternating timings of {thr['steps']} steps, TF op determinism on (the training default).",
        "",
        "| member | pipeline img/s | in-memory img/s | pipeline / in-memory | pipeline alone img/s | inference img/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in thr["rows"]:
        lines.append(
            f"| {r['backbone']} | {_fmt(r['train_img_s_pipeline'], 1)} | {_fmt(r['train_img_s_in_memory'], 1)} | "
            f"{_fmt(r['pipeline_over_memory'], 3)} | {_fmt(r['pipeline_alone_img_s'], 1)} | {_fmt(r['infer_img_s'], 1)} |"
        )
    lines.append("")
    return lines


def _efficiency_section(eff: dict) -> list[str]:
    """Section 3: achieved GFLOP/s against the matmul peak measured in the same run."""
    return [
        "## 3. Compute efficiency",
        "",
        f"{eff['backbone']} Unet at {eff['image_size']} px: {eff['forward_gflop_per_image']:.3f} GFLOP per image forward "
        "(TF profiler), training counted as 3x forward. Peak = float32 2048x2048 matmul measured in the same run "
        f"(TF {eff['matmul_gflops_tf']:.1f} GFLOP/s, numpy {eff['matmul_gflops_numpy']:.1f} GFLOP/s; the higher is used).",
        "",
        "| | achieved GFLOP/s | fraction of peak |",
        "|---|---|---|",
        f"| training (in-memory) | {eff['train_gflops_achieved']:.1f} | {eff['train_fraction_of_peak']:.1%} |",
        f"| training (real pipeline) | | {eff['train_fraction_of_peak_pipeline']:.1%} |",
        f"| inference | {eff['infer_gflops_achieved']:.1f} | {eff['infer_fraction_of_peak']:.1%} |",
        "",
    ]


def _inference_section(inf: dict) -> list[str]:
    """Section 4: the ensemble against its members per TTA mode, then streaming a folder."""
    lines = [
        "## 4. Ensemble inference",
        "",
        f"{inf['timing_images']} dataset images at their own sizes (read, resize, predict, combine, post-process, resize back); "
        "the ensemble against each member alone through the same code path.",
        "",
        "| TTA | ensemble img/s | members img/s | ensemble time / sum of members | overhead |",
        "|---|---|---|---|---|",
    ]
    for tta, r in inf["tta"].items():
        members = ", ".join(f"{v:.1f}" for v in r["members_img_s"].values())
        lines.append(
            f"| {tta} | {r['ensemble_img_s']:.1f} | {members} | {r['ensemble_s']:.2f}s / "
            f"{r['sum_of_members_s']:.2f}s | {r['overhead']:+.1%} |"
        )
    lines += [
        "",
        f"Streaming a folder of {inf['folder_images']} images (`segx.predict` code path, batches of 8, masks and "
        f"uncertainty maps written): {inf['folder_img_s']:.1f} img/s; resident memory "
        f"{inf['rss_mb_at_10pct']:.0f} MiB after 10%, {inf['rss_mb_at_50pct']:.0f} MiB after 50%, "
        f"{inf['rss_mb_at_100pct']:.0f} MiB at the end.",
        "",
    ]
    return lines


def _search_section(se: dict) -> list[str]:
    """Section 5: segx's searches against a naive grid on the cached validation probabilities."""
    return [
        "## 5. Ensemble search on the real cached validation probabilities",
        "",
        f"{se['members']} members, {se['cases']} validation cases ({se['pixels']:,} pixels at their own sizes); "
        f"{se['kept_pixel_fraction']:.1%} of pixels "
        "survive compaction.",
        "",
        "| method | seconds | val Dice | speed-up vs naive |",
        "|---|---|---|---|",
        f"| naive grid 0.1, threshold 0.5 ({se['naive_combos']} combos) | {se['naive_s']:.3f} | {se['naive_dice']:.4f} | 1 |",
        f"| segx greedy (+ threshold search) | {se['greedy_s']:.4f} | {se['greedy_dice']:.4f} | x{se['speedup_greedy']:.0f} |",
        f"| segx grid 0.1 (+ threshold search) | {se['grid_s']:.4f} | {se['grid_dice']:.4f} | x{se['speedup_grid']:.0f} |",
        f"| segx optimize | {se['optimize_s']:.4f} | {se['optimize_dice']:.4f} | |",
        "",
    ]


# In report order; a stage without a saved file (not run, or failed) has no section.
_SECTIONS = (
    ("accuracy", _accuracy_section),
    ("throughput", _throughput_section),
    ("efficiency", _efficiency_section),
    ("inference", _inference_section),
    ("search", _search_section),
)
