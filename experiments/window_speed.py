"""What the sliding window costs: pixels per second of whole-image patch-mode inference of one
member against the same network's plain batch inference on tiles (issue 10).

    python experiments/window_speed.py [--sizes 1024x1024,517x333,256x256] [--window 128]
                                       [--overlaps 0,0.25,0.5] [--rounds 7]

One Unet (resnet18 encoder, random init: speed does not depend on the weights), built with
``segx.models.build_model`` at the window size. For each image size (width x height, random
uint8 RGB):

- ``tiles``: ``segx.models.predict_probs_modes`` on ceil(H * W / window^2) separate window x
  window tiles, in its batches of 8: as many network inputs as the image has pixels, with no
  overlap, no cutting and no blending. The floor: no whole-image method can do less work.
- ``overlap o``: ``segx.inference.view.predict_cases`` with ``View(mode="patch", size=window,
  overlap=o)`` and the same predict function as ``segx.inference.predictor.member_probs``
  (plain pass, no TTA): windows cut from the image, run in batches of 8, Gaussian-weighted and
  blended, exactly what a member computes for its validation/test caches and ``segx.predict``.
- ``numpy o``: the same call with a predict function that returns constants at once: the
  cutting and blending alone, the part of ``overlap o`` that is not the network.

All variants of all sizes run in one process, after one warm-up call each (graph tracing), in
``--rounds`` rounds; within a round the variants of a size run back to back and the order is
rotated from round to round, so drift in the machine's load hits every variant alike. Each
round gives one ratio per pair of variants (same round, same size); the report gives medians
with their min-max over rounds. Writes experiments/window_speed/results.json (every timing,
after each round) and RESULTS.md (rewrite it with ``--report-only``).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from pathlib import Path

import numpy as np

from segx.benchmark.helpers import read_results, spread, write_results

OUT = Path(__file__).resolve().parent / "window_speed"
BACKBONE = "resnet18"


def parse_sizes(text: str) -> list[tuple[int, int]]:
    sizes = []
    for part in text.split(","):
        width, height = part.lower().split("x")  # as images are usually named: width first
        sizes.append((int(height), int(width)))
    return sizes


def variants(overlaps: list[float]) -> list[str]:
    return ["tiles"] + [f"overlap {o:g}" for o in overlaps] + [f"numpy {o:g}" for o in overlaps]


def n_tiles(height: int, width: int, window: int) -> int:
    return math.ceil(height * width / window**2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1024x1024,517x333,256x256", help="WxH,WxH,... (width x height)")
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--overlaps", default="0,0.25,0.5")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--report-only", action="store_true", help="rewrite RESULTS.md from results.json")
    args = parser.parse_args()
    if args.report_only:
        write_report()
        return

    from segx import models
    from segx.benchmark.study import machine
    from segx.inference.view import View, predict_cases
    from segx.inference.window import count_windows

    sizes = parse_sizes(args.sizes)
    overlaps = [float(o) for o in args.overlaps.split(",")]
    window = args.window
    models.set_determinism(0, False)
    model = models.build_model("unet", BACKBONE, window)

    def network(batch: np.ndarray) -> dict[str, np.ndarray]:
        # What member_probs passes to predict_cases, with the plain pass only.
        return models.predict_probs_modes(model, batch, BACKBONE, ("none",))

    def constant(batch: np.ndarray) -> dict[str, np.ndarray]:
        return {"none": np.full(batch.shape[:3], 0.5, np.float32)}

    rng = np.random.default_rng(0)
    inputs = {}
    for height, width in sizes:
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        tiles = rng.integers(0, 256, (n_tiles(height, width, window), window, window, 3), dtype=np.uint8)
        inputs[(height, width)] = (image, tiles)

    def run(size: tuple[int, int], variant: str) -> float:
        image, tiles = inputs[size]
        start = time.perf_counter()
        if variant == "tiles":
            models.predict_probs_modes(model, tiles, BACKBONE, ("none",))
        else:
            kind, overlap = variant.split()
            view = View("patch", window, overlap=float(overlap))
            for _ in predict_cases([image], view, network if kind == "overlap" else constant):
                pass
        return time.perf_counter() - start

    names = variants(overlaps)
    started = time.strftime("%Y-%m-%d %H:%M")
    saved = {
        "args": vars(args),
        "started": started,
        "machine": machine(),
        "sizes": [
            {
                "height": h,
                "width": w,
                "tiles": n_tiles(h, w, window),
                "windows": {f"{o:g}": count_windows(h, w, window, o) for o in overlaps},
            }
            for h, w in sizes
        ],
        "variants": names,
        "seconds": {f"{w}x{h}": {v: [] for v in names} for h, w in sizes},
        "load": [],
    }
    for size in sizes:  # warm-up: traces the graph for every batch shape the variants use
        for variant in names:
            run(size, variant)
    OUT.mkdir(parents=True, exist_ok=True)
    for round_ in range(args.rounds):
        for size in sizes:
            shift = round_ % len(names)
            for variant in names[shift:] + names[:shift]:
                seconds = run(size, variant)
                saved["seconds"][f"{size[1]}x{size[0]}"][variant].append(seconds)
                print(f"round {round_ + 1} {size[1]}x{size[0]} {variant}: {seconds:.3f} s", flush=True)
        saved["load"].append(os.getloadavg()[0])
        saved["rounds_done"] = round_ + 1
        write_results(OUT, saved)
        write_report(quiet=True)
    write_report()


def mpx(values: list[float]) -> str:
    return spread([v / 1e6 for v in values], 3)


def write_report(quiet: bool = False) -> None:
    """RESULTS.md from results.json (``--report-only`` rewrites it without timing anything)."""
    saved = read_results(OUT)
    args, window = saved["args"], saved["args"]["window"]
    overlaps = [float(o) for o in args["overlaps"].split(",")]
    info = saved["machine"]
    rows, overhead_rows = [], []
    for entry in saved["sizes"]:
        height, width = entry["height"], entry["width"]
        pixels = height * width
        seconds = saved["seconds"][f"{width}x{height}"]
        tiles = seconds["tiles"]
        if not tiles:
            continue
        tile_px = entry["tiles"] * window**2
        rows.append(
            f"| {width}x{height} | tiles (floor) | {entry['tiles']} | 1.00 | {spread(tiles, 3)} | "
            f"{mpx([tile_px / s for s in tiles])} | 1 | {spread([1e3 * s / entry['tiles'] for s in tiles], 1)} | - |"
        )
        for overlap in overlaps:
            key = f"{overlap:g}"
            times, numpy_times = seconds[f"overlap {key}"], seconds[f"numpy {key}"]
            windows = entry["windows"][key]
            rows.append(
                f"| {width}x{height} | overlap {key} | {windows} | {windows / entry['tiles']:.2f} | "
                f"{spread(times, 3)} | {mpx([pixels / s for s in times])} | "
                f"{spread([(pixels / s) / (tile_px / t) for s, t in zip(times, tiles, strict=True)], 3)} | "
                f"{spread([1e3 * s / windows for s in times], 1)} | "
                f"{spread([100 * n / s for n, s in zip(numpy_times, times, strict=True)], 1)} |"
            )
        base = {f"{o:g}": seconds[f"overlap {o:g}"] for o in overlaps}
        pairs = [(a, b) for a in ("0.5",) for b in ("0.25", "0") if a in base and b in base]
        for a, b in pairs:
            ratios = [x / y for x, y in zip(base[a], base[b], strict=True)]
            windows_ratio = entry["windows"][a] / entry["windows"][b]
            overhead_rows.append(
                f"| {width}x{height} | {a} vs {b} | {entry['windows'][a]} / {entry['windows'][b]} = "
                f"{windows_ratio:.2f} | {spread(ratios, 2)} |"
            )
    # Summary: network time per input, pooled over sizes and rounds, for the floor and the windows.
    per_input = {"tiles": [], "windows": []}
    numpy_share = []
    for entry in saved["sizes"]:
        seconds = saved["seconds"][f"{entry['width']}x{entry['height']}"]
        per_input["tiles"] += [1e3 * s / entry["tiles"] for s in seconds["tiles"]]
        for overlap in overlaps:
            key = f"{overlap:g}"
            times = seconds[f"overlap {key}"]
            per_input["windows"] += [1e3 * s / entry["windows"][key] for s in times]
            numpy_share += [100 * n / s for n, s in zip(seconds[f"numpy {key}"], times, strict=True)]
    summary = ""
    if per_input["tiles"] and per_input["windows"]:
        from segx.inference.window import window_starts  # numpy only

        def grid(entry: dict, overlap: float) -> str:
            rows = len(window_starts(entry["height"], window, overlap))
            cols = len(window_starts(entry["width"], window, overlap))
            return f"{cols} x {rows} = {rows * cols}"

        low, high = min(overlaps), max(overlaps)
        explain = "; ".join(
            f"{e['width']}x{e['height']} runs {grid(e, high)} windows at overlap {high:g} and {grid(e, low)} at "
            f"overlap {low:g}, for {e['width'] * e['height'] / window**2:.2f} tiles' worth of pixels"
            for e in saved["sizes"]
        ) + (
            " (the first and last window of each axis touch the borders, so the step shrinks to fit "
            "a whole number of windows, and an axis that is not a multiple of the window needs one "
            "window more even at overlap 0)"
        )
        summary = (
            "Summary: a network input costs about the same as a tile or as a window: "
            f"{statistics.median(per_input['tiles']):.1f} ms per tile against "
            f"{statistics.median(per_input['windows']):.1f} ms per window (medians over every size and "
            "round), and cutting plus Gaussian blending takes a median "
            f"{statistics.median(numpy_share):.1f}% (at most {max(numpy_share):.1f}%) of a whole-image "
            "call. So the sliding window's cost against the floor is its window count: 'vs floor' "
            "follows tiles / windows, and raising the overlap multiplies time by the ratio of window "
            f"counts. Those counts (`count_windows`) are not 1 / (1 - overlap)^2 times the tiles: {explain}.\n\n"
        )
    done = saved.get("rounds_done", 0)
    load = saved.get("load") or [float("nan")]
    text = (
        "# Sliding-window inference speed against plain tiles\n\n"
        f"`python experiments/window_speed.py --sizes {args['sizes']} --window {window} --overlaps "
        f"{args['overlaps']} --rounds {args['rounds']}` ({saved['started']}; {done} of {args['rounds']} "
        f"rounds done). Machine: {info.get('cpu')}, {info.get('cores')} cores, tensorflow "
        f"{info.get('tensorflow', '?')}; shared with other jobs (1-minute load average after each round "
        f"{min(load):.1f}-{max(load):.1f}). One Unet ({BACKBONE} encoder, random init) built at "
        f"{window} px with `segx.models.build_model`; random uint8 RGB images; plain pass, no TTA; "
        "batches of 8 everywhere.\n\n"
        "- **tiles (floor)**: `segx.models.predict_probs_modes` on ceil(H·W / "
        f"{window}²) separate {window}x{window} tiles: as many network inputs as the image has pixels, "
        "no overlap, no blending. Its px/s counts the tiles' pixels.\n"
        "- **overlap o**: `segx.inference.view.predict_cases` with `View(mode='patch', "
        f"size={window}, overlap=o)` and `member_probs`' predict function: the whole-image path members, "
        "the ensemble and `segx.predict` use. Its px/s counts the image's pixels.\n"
        "- **numpy share**: the same call with a predict function that returns constants (window "
        "cutting, Gaussian weighting and blending alone), as a percentage of the full call's time in "
        "the same round.\n\n"
        "Every variant ran once per round in one process after a warm-up call, the order rotated "
        "between rounds; values are median (min-max) over rounds, ratios taken within a round. "
        "'windows / tiles' is the network work relative to the floor (`segx.inference.window."
        "count_windows`); 'vs floor' is px/s relative to the tiles' px/s in the same round, so "
        "1 / (windows / tiles) is what it would be if the network were the only cost.\n\n"
        + summary
        + "| image (WxH) | variant | network inputs | windows / tiles | seconds | Mpx/s | vs floor | "
        "ms per input | numpy share % |\n|---|---|---|---|---|---|---|---|---|\n"
        + "\n".join(rows)
        + "\n\nCost of more overlap (time ratio within a round, against the ratio of window counts):\n\n"
        "| image (WxH) | overlaps | windows | time ratio |\n|---|---|---|---|\n" + "\n".join(overhead_rows) + "\n"
    )
    write_results(OUT, report=text)
    if not quiet:
        print(text)


if __name__ == "__main__":
    main()
