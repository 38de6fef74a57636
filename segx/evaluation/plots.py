"""Figures logged with runs (matplotlib, headless)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

from segx.inference.overlay import PREVIEW_SIDE, overlay, thumbnail  # noqa: E402, F401 - figures draw with them
from segx.inference.overlay import at as _at
from segx.inference.overlay import contours as _contours


def pick_cases(scores: np.ndarray, k: int = 4) -> tuple[list[int], list[str]]:
    """Which cases a figure shows: the worst half of ``k`` by ``scores`` (lowest first) and the
    rest nearest the median (typical ones); returns (indices, labels such as "worst 1", "median")."""
    scores = np.asarray(scores, np.float64)
    order = np.argsort(scores, kind="stable")
    k = min(k, len(scores))
    worst = [int(i) for i in order[: (k + 1) // 2]]
    median = float(np.median(scores)) if len(scores) else 0.0
    typical = [int(i) for i in np.argsort(np.abs(scores - median), kind="stable") if int(i) not in worst][
        : k - len(worst)
    ]
    return worst + typical, [f"worst {n + 1}" for n in range(len(worst))] + ["typical"] * len(typical)


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_curves(
    history: Mapping[str, Sequence[tuple[int, float]]],
    path: str | os.PathLike,
    best_epoch: int | None = None,
    validation: str = "validation split",
) -> Path:
    """Per-epoch curves: losses (training and validation), Dice and IoU, the learning rate.

    ``history``: metric key (``curves/train_loss``, ...) -> (epoch from 1, value) pairs; validation
    curves may skip epochs (``trainer.val_every``). ``best_epoch``: the epoch whose weights were
    kept, marked on every panel. ``validation`` names what the validation curves were computed on.
    """
    panels = (
        ("loss", [k for k in history if k.endswith("loss")], False),
        ("Dice, IoU (threshold 0.5)", [k for k in history if k.endswith(("_dice", "_iou"))], False),
        ("learning rate", [k for k in history if k.endswith("/lr")], True),
    )
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    for ax, (title, keys, log_scale) in zip(axes, panels, strict=True):
        for key in keys:
            steps, values = zip(*history[key], strict=True) if history[key] else ((), ())
            ax.plot(steps, values, marker="o", ms=3, label=key.split("/", 1)[-1].replace("_", " "))
        if best_epoch is not None:
            ax.axvline(best_epoch, color="0.3", ls="--", lw=1, label=f"kept: epoch {best_epoch}")
        if log_scale and keys and all(v > 0 for k in keys for _, v in history[k]):
            ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if keys or best_epoch is not None:
            ax.legend(fontsize=8)
    fig.suptitle(f"training curves; validation: {validation}", fontsize=10)
    return _save(fig, path)


@dataclass(frozen=True)
class ShownCases:
    """What a case figure draws: one row per case (its thumbnail, ground truth and name), one
    column per prediction. ``true`` and each of ``preds``: one mask per case (label maps where the
    figure has several classes). ``scores``: column name -> one score per case, printed in the
    column's titles. ``row_labels`` (one per row, e.g. "worst", "median") are printed beside each
    case's name."""

    images: Sequence[np.ndarray]
    true: Sequence[np.ndarray]
    preds: Mapping[str, Sequence[np.ndarray]]
    stems: Sequence[str]
    scores: Mapping[str, np.ndarray] | None = None
    row_labels: Sequence[str] | None = None


def plot_cases(
    shown: ShownCases,
    path: str | os.PathLike,
    n: int = 4,
    title: str = "",
    classes: Sequence[str] | None = None,
    colours: Sequence | None = None,
) -> Path:
    """Grid: the first ``n`` of ``shown``'s cases, one row each, one column per prediction; true
    contour green, predicted red. ``title`` says which split (and which cases) the figure shows.

    Several classes (``classes``: names, background first; ``shown.true`` and ``shown.preds`` label
    maps): the first column is the ground truth, every column draws each class's contours in its
    colour (``colours``, RGB), and a legend names the classes."""
    if classes is not None:
        return _plot_class_cases(shown, path, n, title, classes, colours)
    n = min(n, len(shown.images))
    names = list(shown.preds)
    fig, axes = plt.subplots(n, len(names), figsize=(3 * len(names), 3 * n), squeeze=False)
    _fill_grid(
        axes,
        shown,
        names,
        lambda image, row, name: _contours(
            image, _at(shown.true[row], image.shape), _at(shown.preds[name][row], image.shape)
        ),
        "Dice",
    )
    fig.suptitle(f"{title + ' - ' if title else ''}green: ground truth, red: prediction", fontsize=9)
    return _save(fig, path)


def _fill_grid(axes, shown: ShownCases, names, draw, score_name: str) -> None:
    """One row per case, one column per name: ``draw(image, row, name)`` shown, the column's name
    and the case's score as its title, the case's name (and row label) beside the row."""
    scores, stems, row_labels = shown.scores, shown.stems, shown.row_labels
    for row, axes_row in enumerate(axes):
        image = shown.images[row]
        for col, name in enumerate(names):
            ax = axes_row[col]
            ax.imshow(draw(image, row, name))
            heading = name if row == 0 else ""
            if scores is not None and name in scores:
                heading = f"{heading}\n{score_name} {scores[name][row]:.3f}".strip()
            ax.set_title(heading, fontsize=8)
            ax.set_axis_off()
        label = stems[row] if row_labels is None else f"{row_labels[row]}: {stems[row]}"
        axes_row[0].text(-2, image.shape[0] // 2, label, rotation=90, va="center", ha="right", fontsize=7)


def _labels_at(labels: np.ndarray, shape) -> np.ndarray:
    """A label map at a thumbnail's size (nearest neighbour: a label is never blended)."""
    import cv2

    if labels.shape[:2] == tuple(shape[:2]):
        return np.asarray(labels, np.uint8)
    return cv2.resize(np.asarray(labels, np.uint8), (int(shape[1]), int(shape[0])), interpolation=cv2.INTER_NEAREST)


def _plot_class_cases(shown: ShownCases, path, n, title, classes, colours) -> Path:
    from matplotlib.patches import Patch

    from segx.inference.overlay import class_colours, overlay_classes

    colours = list(colours) if colours is not None else class_colours(len(classes))
    n = min(n, len(shown.images))
    columns = {"ground truth": shown.true, **shown.preds}
    names = list(columns)
    fig, axes = plt.subplots(n, len(names), figsize=(3 * len(names), 3 * n + 0.6), squeeze=False)
    _fill_grid(
        axes[:n],
        shown,
        names,
        lambda image, row, name: overlay_classes(
            image, _labels_at(columns[name][row], image.shape), classes, colours, legend=False
        ),
        "foreground Dice",
    )
    handles = [Patch(color=np.asarray(colours[c]) / 255.0, label=classes[c]) for c in range(1, len(classes))]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8, frameon=False)
    fig.suptitle(f"{title + ' - ' if title else ''}each class's contours in its colour", fontsize=9)
    fig.subplots_adjust(bottom=0.6 / (3 * n + 0.6))
    return _save(fig, path)
