"""What an ensemble run reports: per-case test metrics for every method (members, equal weights,
majority vote, the ensemble), their summary, the validation table, figures and the printed
report. Members, equal weights and majority vote are scored at threshold 0.5 on test; the
ensemble at its validation-chosen threshold (the tables carry a threshold column)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from segx.ensembling.choose import SearchOutcome
from segx.ensembling.members import Member
from segx.ensembling.record import EnsembleRecord


def score_test_split(members: list[Member], record: EnsembleRecord, spacing=None):
    """Per-case test metrics for each method (each member, equal weights, majority vote, and the
    ensemble ``record`` with its weights and decision), at each image's own size (HD95 in pixels,
    or in the units of ``spacing``): a long DataFrame, and each method's label maps."""
    from segx.ensembling.members import unique_labels
    from segx.ensembling.task import task_for

    task = task_for(record.labels)
    test = members[0].test
    probs = [m.test.probs for m in members]
    # Unique names: two members with one backbone and arch (resize and patch) must not share a row.
    names = [f"member:{label}" for label in unique_labels(members)]
    rows, preds = [], {}
    for name, make, at in task.test_methods(probs, names, record):
        pred = make()
        preds[name] = pred
        scores = task.case_metrics(pred, test.masks, spacing)
        for i, stem in enumerate(test.stems):
            rows.append({"method": name, "threshold": at, "stem": stem, **{k: float(v[i]) for k, v in scores.items()}})
    return pd.DataFrame(rows), preds


def summarise_test(per_case: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """The test summary per method, and where the scores are per class (several classes,
    regions) the per-class table: the summary's means are then the foreground mean of the
    per-class means, as the search counts them."""
    summary = summarise(per_case)
    if not any("/" in c for c in per_case.columns):
        return summary, None
    per_class = class_summary(per_case)
    for score in ("dice", "iou", "hd95"):
        summary[f"{score}_mean"] = per_class[score]
    return summary, per_class


def class_summary(per_case: pd.DataFrame) -> pd.DataFrame:
    """Per method, the multi-class scores as the search counts them: for each class the mean over
    the cases that count it (pandas skips NaN), then ``dice``/``iou``/``hd95`` as the mean over
    foreground classes of those (nnU-Net's foreground mean)."""
    order = list(dict.fromkeys(per_case["method"]))
    per_class = [c for c in per_case.columns if "/" in c]
    table = per_case.groupby("method", sort=False)[per_class].mean()
    for metric in ("dice", "iou", "hd95"):
        cols = [c for c in per_class if c.startswith(metric + "/")]
        if cols:
            table[metric] = table[cols].mean(axis=1)
    return table.loc[order]


def paired_bootstrap(a, b, resamples: int = 2000, seed: int = 0) -> dict:
    """Paired bootstrap over cases of mean(a) - mean(b) (a, b: per-case scores of two methods on
    the same cases): the observed difference, a 95% percentile interval, and the share of
    resamples in which a did not beat b."""
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or not len(a):
        raise ValueError("paired scores of equal, non-zero length")
    diff = a - b
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, 500):  # 500 resamples at a time bounds memory on big test sets
        stop = min(resamples, start + 500)
        means[start:stop] = diff[rng.integers(0, len(diff), (stop - start, len(diff)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {
        "diff": float(diff.mean()),
        "low": float(low),
        "high": float(high),
        "p_not_better": float(np.mean(means <= 0)),
        "resamples": int(resamples),
        "cases": len(diff),
    }


@dataclass(frozen=True)
class Gain:
    """Is the ensemble worth its cost (:func:`honest_gain`)? Test Dice, ensemble minus the best
    member: the paired bootstrap's difference, 95% interval and share of resamples where the
    ensemble is not better, over ``cases``; the best member and both Dices; and the selection
    optimism of each (validation Dice minus test Dice). ``tables/gain.csv`` is one row of it."""

    diff: float
    low: float
    high: float
    p_not_better: float
    resamples: int
    cases: int
    best_member: str  # "member:<label>", best on validation
    best_member_threshold: float | None  # where one threshold decides: the one validation chose for it
    best_member_val_dice: float
    best_member_test_dice: float
    ensemble_val_dice: float
    ensemble_test_dice: float
    ensemble_optimism: float
    best_member_optimism: float

    @property
    def verdict(self) -> str:
        return gain_verdict(self.cases, self.low, self.high)

    def to_row(self) -> dict:
        """The columns of ``tables/gain.csv``, in its order."""
        return asdict(self)


def honest_gain(
    per_case: pd.DataFrame, members: list[Member], found: SearchOutcome, resamples: int = 2000, seed: int = 0
) -> Gain:
    """Is the ensemble worth its cost? The paired bootstrap of test Dice, ensemble minus the best
    single member (best on validation, as a user would pick it without the ensemble), and the
    selection optimism of both (validation Dice of the choice minus its test Dice)."""
    from segx.ensembling.probs import binarize
    from segx.ensembling.task import task_of_record
    from segx.scoring.metrics import dice_per_case

    member_rows = [b for b in found.baselines if b.name.startswith("member:")]
    index, best = max(enumerate(member_rows), key=lambda item: item[1].val_dice)
    stems = members[0].test.stems
    one_threshold = task_of_record(members[index].labels).one_threshold
    if one_threshold:
        # Like for like: the member on test at the threshold validation chose for it (as the
        # ensemble is at its own), not at 0.5; both are then what a user would deploy.
        test = members[index].test
        member_test = dice_per_case(binarize(_single(test.probs), best.threshold), test.masks)
    else:  # the member's test rows: no one threshold to choose (argmax, or regions at 0.5 each)
        by_method = per_case.set_index(["method", "stem"])["dice"]
        member_test = by_method.loc[best.name].loc[stems].to_numpy()
    ensemble = per_case[per_case.method == "ensemble"].set_index("stem").loc[stems, "dice"].to_numpy()
    return Gain(
        **paired_bootstrap(ensemble, member_test, resamples, seed),
        best_member=best.name,
        best_member_threshold=best.threshold if one_threshold else None,
        best_member_val_dice=best.val_dice,
        best_member_test_dice=float(member_test.mean()),
        ensemble_val_dice=found.val_dice,
        ensemble_test_dice=float(ensemble.mean()),
        ensemble_optimism=found.val_dice - float(ensemble.mean()),
        best_member_optimism=best.val_dice - float(member_test.mean()),
    )


def _single(probs):
    """One member's probabilities as an exact ensemble score (weight 1 of 1)."""
    from segx.ensembling.probs import Weights, combine

    return combine([probs], Weights((1,), 1))


def summarise(per_case: pd.DataFrame) -> pd.DataFrame:
    order = list(dict.fromkeys(per_case["method"]))
    g = per_case.groupby("method", sort=False)
    table = pd.DataFrame(
        {
            "threshold": g["threshold"].first(),
            "dice_mean": g["dice"].mean(),
            "dice_median": g["dice"].median(),
            "dice_std": g["dice"].std(ddof=0),
            "iou_mean": g["iou"].mean(),
            "hd95_mean": g["hd95"].mean(),
            "hd95_median": g["hd95"].median(),
            "cases": g["dice"].size(),
        }
    )
    return table.loc[order]


def val_table(members: list[Member], found: SearchOutcome) -> pd.DataFrame:
    rows = [{"method": b.name, "val_dice": b.val_dice, "threshold": b.threshold} for b in found.baselines]
    rows[-1]["method"] = "equal-weights"
    rows.append({"method": "majority-vote", "val_dice": found.majority_val_dice, "threshold": 0.5})
    s = found.searched.best
    rows.append({"method": f"searched ({s.name})", "val_dice": s.val_dice, "threshold": s.threshold})
    rows.append(
        {"method": f"chosen ({found.chosen.name})", "val_dice": found.val_dice, "threshold": found.chosen.threshold}
    )
    table = pd.DataFrame(rows)
    from segx.ensembling.task import task_of_record

    if members and not task_of_record(members[0].labels).one_threshold:
        table = table.drop(columns="threshold")  # argmax, or a threshold per region (in the record)
    return table


def plot_ensemble(
    folder: Path,
    members: list[Member],
    found: SearchOutcome,
    preds: dict,
    per_case: pd.DataFrame,
    preview_cases: int = 4,
) -> None:
    """folder/search.png (the search's progress against the baselines) and folder/test_cases.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from segx.ensembling.task import task_of_record
    from segx.evaluation.plots import ShownCases, pick_cases, plot_cases

    task = task_of_record(members[0].labels)
    history = found.searched.history
    searched, chosen = found.searched.best, found.chosen
    fig, ax = plt.subplots(figsize=(8, 4.2))
    steps, values = [h["step"] for h in history], [h["val_dice"] for h in history]
    ax.plot(steps, values, marker=".", lw=1, color="C0", label=f"{searched.name.split(':')[0]} search: each candidate")
    for i, b in enumerate(found.baselines):
        name = "equal weights" if i == len(found.baselines) - 1 else b.name.removeprefix("member:")
        ax.axhline(b.val_dice, ls=":", lw=1, color=f"C{i + 1}", label=f"{name} ({b.val_dice:.4f})")
    ax.axhline(
        found.majority_val_dice, ls="-.", lw=0.8, color="0.5", label=f"majority vote ({found.majority_val_dice:.4f})"
    )
    # The chosen point: a search candidate where the search won, else on the line of the baseline that did.
    at = next((h["step"] for h in history if h["val_dice"] == chosen.val_dice), steps[-1] if steps else 0)
    ax.plot(
        [at],
        [chosen.val_dice],
        marker="*",
        ms=14,
        color="crimson",
        ls="none",
        label=f"chosen: {chosen.name} ({chosen.val_dice:.4f}, {task.decision_words(chosen)})",
    )
    ax.set_xlabel("search step / candidate")
    ax.set_ylabel(task.dice_axis)
    ax.set_title("validation split: the ensemble search against its members", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    folder.mkdir(parents=True, exist_ok=True)
    fig.savefig(folder / "search.png", dpi=100)
    plt.close(fig)
    test = members[0].test
    names = [n for n in preds if n.startswith("member:")] + ["ensemble"]
    scores = {n: per_case[per_case.method == n]["dice"].to_numpy() for n in names}
    if len(test.previews) == len(test.stems):  # a thumbnail of every case: the worst and typical by the ensemble's Dice
        shown, labels = pick_cases(scores["ensemble"], preview_cases)
        what = f"worst and typical of {len(test.stems)} cases by the ensemble's Dice"
    else:  # members of segx before 0.3 cached the first four cases only
        shown, labels = list(range(min(len(test.previews), preview_cases))), None
        what = f"the first {min(len(test.previews), preview_cases)} of {len(test.stems)} cases"
    if shown:
        plot_cases(
            ShownCases(
                [test.previews[i] for i in shown],
                [test.masks[i] for i in shown],
                {n: [preds[n][i] for i in shown] for n in names},
                [test.stems[i] for i in shown],
                {n: s[shown] for n, s in scores.items()},
                row_labels=labels,
            ),
            folder / "test_cases.png",
            n=len(shown),
            title=f"test split (never seen by the search): {what}",
            classes=test.classes,
            colours=task.palette,  # the data's palette, or segx's colours (one structure: none drawn)
        )


MIN_BOOTSTRAP_CASES = 10  # fewer test cases: a bootstrap interval only spans their own differences


def gain_verdict(cases: int, low: float, high: float) -> str:
    """What the paired bootstrap says, in words; with fewer than MIN_BOOTSTRAP_CASES test cases it
    says that it cannot tell (resampling 2 or 3 cases gives an interval, not evidence)."""
    if cases < MIN_BOOTSTRAP_CASES:
        return (
            f"too few test cases ({cases}) for the interval to mean anything; "
            f"add test cases (at least {MIN_BOOTSTRAP_CASES}) before reading a gain"
        )
    if low > 0:
        return "the gain is real (the whole interval is above zero)"
    if high < 0:
        return "the ensemble is worse (the whole interval is below zero)"
    return "not shown to be better: the interval includes zero"


def print_report(
    record: EnsembleRecord, members, val_table, summary, found, gain: Gain | None = None, cases: str = "case"
) -> None:
    """``cases``: what a case is, for the headings ("case": a 2D image, HD95 in pixels or the
    pixel spacing's units; "volume": a patient's scan, 3D scores, HD95 in mm)."""
    pd.set_option("display.width", 140)
    from segx.ensembling.members import unique_labels

    weights = ", ".join(f"{label}={w:.3f}" for label, w in zip(unique_labels(members), found.weights, strict=True))
    print("\nValidation (weights, threshold and post-processing chosen here)")
    print(val_table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    from segx.ensembling.task import task_for

    how, post = task_for(record.labels).describe(record)
    print(
        f"\nchosen: {found.chosen.name}  weights: {weights}  {how}  "
        f"post-processing: {post}  (search {found.search_seconds:.2f}s)"
    )
    if cases == "volume":
        units = "3D Dice/IoU per volume (a patient's scan), HD95 in mm"
    else:
        spaced = getattr(members[0], "pixel_spacing", None) is not None
        units = f"Dice/IoU per case, HD95 in {'data.pixel_spacing units' if spaced else 'pixels'}"
    print(f"\nTest split (never seen by the search): {units}")
    print(summary.to_string(float_format=lambda v: f"{v:.4f}"))
    if gain:
        at = (
            f"at its validation threshold {gain.best_member_threshold}"
            if gain.best_member_threshold is not None
            else "per-case foreground-mean Dice"
        )
        print(
            f"\nEnsemble minus best member ({gain.best_member}, best on validation, {at}), test Dice: "
            f"{gain.diff:+.4f}, 95% paired bootstrap interval [{gain.low:+.4f}, {gain.high:+.4f}] "
            f"over {gain.cases} {cases}s, {gain.resamples} resamples: {gain.verdict}."
        )
        print(
            f"Selection optimism (validation minus test Dice): ensemble {gain.ensemble_optimism:+.4f}, "
            f"best member {gain.best_member_optimism:+.4f}"
        )
    print(
        f"\nsegx: ensemble run {record.run_id}  (rebuild: python -m segx.predict "
        f"ensemble_run_id={record.run_id} input_dir=... output_dir=...)",
        flush=True,
    )
