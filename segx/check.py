"""Validate a data folder on its own and print a summary; no training, no TensorFlow.

    python -m segx.data.check data.root=PATH         (data=folder is implied)
    python -m segx.data.check data=synthetic

Reads every file the way training does, and reports counts, sizes, bit depths, foreground
fraction and every problem found (not just the first), one line each. Exit status 2 if any.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig

from segx import cli
from segx.config import CONF_PATH
from segx.data.folder import check_disjoint, discover_cases, list_images
from segx.data.io import IMAGE_EXTENSIONS, read_image
from segx.data.labels import IGNORE_INDEX, mask_rule
from segx.errors import SegxError


def check_folder(
    root: Path, mask_threshold: float = 0, max_pixels: int = 64_000_000, labels=None, training=None
) -> tuple[dict, list[str]]:
    """(summary, problems) for ``root``; problems are one-line messages naming files.

    ``labels`` (:class:`segx.data.labels.Labels`, several classes): masks are read as label maps
    and the summary gives, per class, its share of the annotated pixels and how many cases hold it.
    ``training(stems, test_stems)``: the training cases ``segx.train`` would use (a list per
    fold), for its rule that every class is in some training case (None: every training pair).
    The rules ``segx.train`` applies to the folder as a whole are applied here too, shared."""
    from segx.workflows.prepare import require_trained_classes

    rule = mask_rule(labels, mask_threshold)
    k = len(rule.names)  # the classes counted one by one (none for one structure)
    problems: list[str] = []
    summary: dict = {"root": str(root)}
    found: dict[str, list] = {}
    present: dict[str, np.ndarray] = {}  # stem -> bool (K,): the classes a training pair holds
    for images_dir, masks_dir in (("train_images", "train_masks"), ("test_images", "test_masks")):
        if images_dir == "test_images" and not (root / images_dir).is_dir():
            continue
        try:
            cases = discover_cases(root, images_dir, masks_dir)
        except SegxError as exc:
            cases = _loose_pairs(root, images_dir, masks_dir, problems, exc)
        found[images_dir] = cases
        sizes, fg, empty = Counter(), [], 0
        class_pixels, class_cases = np.zeros(k, np.int64), np.zeros(k, np.int64)
        for case in cases:
            try:
                image = read_image(case.image, max_pixels)
                sizes[f"{image.shape[1]}x{image.shape[0]}"] += 1
                if case.mask is None:
                    continue
                indices = rule.read(case.mask, max_pixels)  # class indices; {0, 1} for one structure
                counts = np.bincount(indices.ravel(), minlength=256)[:k]
                class_pixels += counts
                class_cases += counts > 0
                if images_dir == "train_images":
                    present[case.stem] = counts > 0
                mask = ((indices > 0) & (indices != IGNORE_INDEX)).astype(np.uint8)
                if mask.shape != image.shape[:2]:
                    problems.append(
                        f"{case.mask}: mask is {mask.shape[1]}x{mask.shape[0]} but its image is {image.shape[1]}x{image.shape[0]}"
                    )
                    continue
                fg.append(float(mask.mean()))
                empty += not mask.any()
            except SegxError as exc:
                problems.append(str(exc))
        summary[images_dir] = {
            "pairs": len(cases),
            "sizes": dict(sizes.most_common(8)),
            "foreground_mean": float(np.mean(fg)) if fg else float("nan"),
            "foreground_min": float(np.min(fg)) if fg else float("nan"),
            "empty_masks": empty,
        }
        if rule.per_class:
            total = max(int(class_pixels.sum()), 1)
            summary[images_dir]["classes"] = {
                name: {"pixel_fraction": float(class_pixels[c] / total), "cases": int(class_cases[c])}
                for c, name in enumerate(rule.names)
            }
        if cases and fg and empty == len(fg):
            problems.append(f"{root / masks_dir}: every mask is empty; check the masks or data.mask_threshold")
    train, test = found.get("train_images", []), found.get("test_images", [])
    try:
        check_disjoint(root, train, test)
    except SegxError as exc:
        problems.append(str(exc))
    try:
        if rule.per_class and train:
            stems, test_stems = [c.stem for c in train], [c.stem for c in test] or None
            for stems_ in training(stems, test_stems) if training is not None else [stems]:
                in_train = np.zeros(k, bool)
                for stem in stems_:
                    in_train |= present.get(stem, False)
                require_trained_classes(rule, in_train, root)
    except SegxError as exc:
        problems.append(str(exc))
    return summary, problems


def _loose_pairs(root: Path, images_dir: str, masks_dir: str, problems: list[str], error: SegxError):
    """Whatever pairs exist, so the rest of the folder is still checked after a pairing error;
    every unpaired file is listed (``error`` is reported when the problem is not pairing)."""
    from segx.data.folder import Case

    try:
        images = list_images(root / images_dir) if (root / images_dir).is_dir() else {}
        masks = list_images(root / masks_dir) if (root / masks_dir).is_dir() else {}
    except SegxError as exc:
        problems.append(str(exc))
        return []
    unpaired = sorted(set(images) ^ set(masks))
    if not unpaired or not images or not masks:
        problems.append(str(error))
    for stem in unpaired if images and masks else []:
        where = images.get(stem) or masks.get(stem)
        problems.append(f"{where}: no matching {'mask' if stem in images else 'image'}")
    return [Case(s, images[s], masks[s]) for s in sorted(set(images) & set(masks))]


def print_report(summary: dict, problems: list[str]) -> None:
    print(f"data folder: {summary['root']}")
    for part in ("train_images", "test_images"):
        if part in summary:
            s = summary[part]
            print(
                f"  {part}: {s['pairs']} pairs; sizes {s['sizes']}; foreground mean {s['foreground_mean']:.3f} "
                f"(min {s['foreground_min']:.4f}); empty masks {s['empty_masks']}"
            )
            for name, c in s.get("classes", {}).items():
                print(
                    f"    {name}: {c['pixel_fraction']:.4f} of annotated pixels, in {c['cases']} of {s['pairs']} cases"
                )
    print(f"  image extensions read: {', '.join(IMAGE_EXTENSIONS)}")
    if problems:
        print(f"{len(problems)} problem(s):")
        for p in problems:
            print(f"  - {p}")
    else:
        print("no problems found")


def run_check(cfg: DictConfig) -> list[str]:
    """Check the configured data folder, print the report; return the problems found."""
    from segx.data.synthetic import generate
    from segx.workflows.prepare import is_volume_data, labels_of, training_stems, validate_data_config

    validate_data_config(cfg.data)
    root = Path(str(cfg.data.root))
    if cfg.data.kind == "synthetic":
        generate(
            root,
            int(cfg.data.n_images),
            int(cfg.data.source_size),
            int(cfg.data.generator_seed),
            str(cfg.data.get("scene", "nuclei")),
        )
    if not root.is_dir() and cfg.data.kind != "synthetic_volumes":
        raise SegxError(f"data folder {root} does not exist; set data.root=PATH to your data")
    split = lambda stems, test_stems: training_stems(cfg.data, str(cfg.paths.output_dir), stems, test_stems)  # noqa: E731
    if is_volume_data(cfg.data):  # every volume read and checked, then its slices as any 2D folder
        root, split = _volume_slices(cfg)
    summary, problems = check_folder(
        root, float(cfg.data.mask_threshold), int(cfg.data.max_pixels), labels_of(cfg.data), split
    )
    print_report(summary, problems)
    return problems


def _volume_slices(cfg: DictConfig):
    """A volume dataset's slice folder, and its training slices as segx.train splits them: by patient."""
    from segx.data.volume_prep import case_of
    from segx.workflows.prepare import _sliced_volumes, training_stems

    sliced = _sliced_volumes(cfg.data, str(cfg.paths.output_dir), None)
    plan, data = sliced.plan, sliced.dataset
    norms = ", ".join(f"{name}: {n.kind}" for name, n in zip(data.channel_names, plan.norms, strict=True))
    print(
        f"volume dataset {cfg.data.root} ({data.layout}): {len(data.train)} training and {len(data.test)} test cases; "
        f"sliced along {'zyx'[plan.slice_axis]}, in-plane {plan.spacing[0]:g} x {plan.spacing[1]:g} mm, "
        f"context {plan.context}, normalised {norms}; its slices below"
    )

    def split(stems, test_stems):
        cases = sorted({case_of(s) for s in stems})
        tests = sorted({case_of(s) for s in test_stems}) if test_stems else None
        chosen = training_stems(cfg.data, str(cfg.paths.output_dir), cases, tests)
        return [[s for s in stems if case_of(s) in set(part)] for part in chosen]

    return sliced.folder, split


@hydra.main(version_base="1.3", config_path=CONF_PATH, config_name="check")
@cli.task
def _hydra_main(cfg: DictConfig) -> None:
    if run_check(cfg):
        sys.exit(2)  # every problem is listed above, one line each


def main() -> None:
    cli.run(_hydra_main, "check")


if __name__ == "__main__":
    main()
