"""What an ensemble run reports: per-case test metrics for every method (members, equal weights,
majority vote, the ensemble), their summary, the validation table, figures and the printed
report. Members, equal weights and majority vote are scored at threshold 0.5 on test; the
ensemble at its validation-chosen threshold (the tables carry a threshold column)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from segx.ensembling.members import Member


def score_test_split(members: list[Member], weights, threshold, post, spacing=None):
    """Per-case test metrics for each method, at each image's own size (HD95 in pixels, or in
    the units of ``spacing``): a long DataFrame."""
    from segx.ensembling.probs import Weights, binarize, combine
    from segx.ensembling.search import majority_vote
    from segx.evaluation.metrics import case_metrics
    from segx.inference.postprocess import PostProcess, apply

    test = members[0].test
    truth = test.masks
    probs = [m.test.probs for m in members]
    weights = Weights.of(weights)  # exact counts; floats (an old record's) are read as decimals
    methods = {f"member:{m.label}": (lambda i=i: probs[i].like(probs[i].flat >= 128)) for i, m in enumerate(members)}
    equal = Weights((1,) * len(members), len(members))
    methods["equal-weights"] = lambda: binarize(combine(probs, equal), 0.5)
    methods["majority-vote"] = lambda: majority_vote(probs)
    methods["ensemble (no post-processing)"] = lambda: binarize(combine(probs, weights), threshold)
    methods["ensemble"] = lambda: apply(binarize(combine(probs, weights), threshold), post)
    rows, preds = [], {}
    for name, make in methods.items():
        if name == "ensemble (no post-processing)" and post == PostProcess():
            continue
        pred = make()
        preds[name] = pred
        scores = case_metrics(pred, truth, spacing=spacing)
        # Only the ensemble's threshold was chosen (on validation); the others are at 0.5.
        at = threshold if name.startswith("ensemble") else 0.5
        for i, stem in enumerate(test.stems):
            rows.append({"method": name, "threshold": at, "stem": stem, **{k: float(v[i]) for k, v in scores.items()}})
    return pd.DataFrame(rows), preds


def summarise(per_case: pd.DataFrame) -> pd.DataFrame:
    order = list(dict.fromkeys(per_case["method"]))
    g = per_case.groupby("method", sort=False)
    table = pd.DataFrame({
        "threshold": g["threshold"].first(),
        "dice_mean": g["dice"].mean(), "dice_median": g["dice"].median(), "dice_std": g["dice"].std(ddof=0),
        "iou_mean": g["iou"].mean(), "hd95_mean": g["hd95"].mean(), "hd95_median": g["hd95"].median(),
        "cases": g["dice"].size(),
    })  # fmt: skip
    return table.loc[order]


def val_table(members: list[Member], found: dict) -> pd.DataFrame:
    rows = [{"method": b.name, "val_dice": b.val_dice, "threshold": b.threshold} for b in found["baselines"]]
    rows[-1]["method"] = "equal-weights"
    rows.append({"method": "majority-vote", "val_dice": found["majority_val_dice"], "threshold": 0.5})
    s = found["searched"].best
    rows.append({"method": f"searched ({s.name})", "val_dice": s.val_dice, "threshold": s.threshold})
    rows.append({"method": f"chosen ({found['chosen'].name})", "val_dice": found["val_dice"], "threshold": found["chosen"].threshold})
    return pd.DataFrame(rows)


def plot_ensemble(folder: Path, members: list[Member], found: dict, preds: dict, per_case: pd.DataFrame) -> None:
    """folder/search.png (the search's progress against the baselines) and folder/test_cases.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from segx.evaluation.plots import plot_cases

    history = found["searched"].history
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([h["step"] for h in history], [h["val_dice"] for h in history], marker=".", lw=1)
    for b in found["baselines"]:
        ax.axhline(b.val_dice, ls=":", lw=0.8)
    ax.set_xlabel("search step / candidate")
    ax.set_ylabel("validation Dice")
    ax.set_title(f"{found['searched'].best.name} search (dotted: members and equal weights)")
    fig.tight_layout()
    folder.mkdir(parents=True, exist_ok=True)
    fig.savefig(folder / "search.png", dpi=100)
    plt.close(fig)
    test = members[0].test
    k = min(len(test.previews), 4)
    if k:
        names = [n for n in preds if n.startswith("member:")] + ["ensemble"]
        scores = {n: per_case[per_case.method == n]["dice"].to_numpy()[:k] for n in names}
        plot_cases(test.previews[:k], test.masks[:k], {n: preds[n][:k] for n in names}, test.stems[:k],
                   folder / "test_cases.png", scores, n=k)


def print_report(record, members, val_table, summary, found) -> None:
    pd.set_option("display.width", 140)
    weights = ", ".join(f"{m.label}={w:.3f}" for m, w in zip(members, found["weights"], strict=True))
    print("\nValidation (weights, threshold and post-processing chosen here)")
    print(val_table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"\nchosen: {found['chosen'].name}  weights: {weights}  threshold: {record['threshold']}  "
          f"post-processing: {found['postprocess'].describe()}  (search {found['search_seconds']:.2f}s)")
    print("\nTest split (never seen by the search): Dice/IoU per case, HD95 in pixels")
    print(summary.to_string(float_format=lambda v: f"{v:.4f}"))
    print(f"\nsegx: ensemble run {record['run_id']}  (rebuild: python -m segx.predict ensemble_run_id={record['run_id']} input_dir=... output_dir=...)", flush=True)
