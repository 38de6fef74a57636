"""Do tf.data's options speed up segx's training input pipeline? (issue 15)

    python experiments/tfdata_options.py [--backbone resnet18] [--size 128] [--steps 15] [--rounds 4]

The member's real pipeline (``segx.training.fit.make_train_dataset``: DSB2018 training images,
``augment=strong`` through albumentations in worker threads, the encoder's preprocessing) feeds
``model.fit`` with one variant of ``tf.data.Options`` at a time; every variant keeps the element
order (segx's runs are reproducible, so ``deterministic=False`` is not a candidate). An
in-memory dataset of one fixed batch bounds what any pipeline option could reach. One process,
one model; ``--rounds`` rounds, each timing ``--steps`` training steps per variant in an order
rotated from round to round; images/s and the ratio to segx's pipeline within the round.

Writes experiments/tfdata_options/{results.json,RESULTS.md}.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from segx.benchmark.helpers import spread, write_results

OUT = Path(__file__).resolve().parent / "tfdata_options"
ROOT = OUT.parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "datasets" / "dsb2018_nuclei"


def variants(tf):
    def options(**settings):
        opts = tf.data.Options()
        for path, value in settings.items():
            target = opts
            *parents, leaf = path.split(".")
            for p in parents:
                target = getattr(target, p)
            setattr(target, leaf, value)
        return opts

    return {
        "segx (map AUTOTUNE, prefetch AUTOTUNE)": None,
        "experimental_slack": options(experimental_slack=True),
        "threading.max_intra_op_parallelism=1": options(**{"threading.max_intra_op_parallelism": 1}),
        "autotune.ram_budget 1 GB": options(**{"autotune.ram_budget": 2**30}),
        "slack + intra-op 1": options(experimental_slack=True, **{"threading.max_intra_op_parallelism": 1}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--cases", type=int, default=64)
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import segx.backend  # noqa: F401
    from segx import models
    from segx.backend import tf
    from segx.config import compose
    from segx.objects import build_augmentation
    from segx.training.augment import SeededAugmenter
    from segx.training.fit import make_train_dataset
    from segx.training.settings import FitSettings
    from segx.workflows.prepare import prepare

    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="segx-tfdata-") as work:
        cfg = compose(
            "train",
            overrides=[
                "data=folder",
                f"data.root={DATA}",
                f"data.image_size={args.size}",
                f"data.limit_cases={args.cases}",
                f"paths.output_dir={work}",
                "augment=strong",
                f"backbone={args.backbone}",
            ],
        )
        train = prepare(cfg.data, cfg.paths.output_dir).part("train")
        pipeline = build_augmentation(cfg.augment.transforms)
        models.set_determinism(0, True)  # as members train by default
        model = models.build_model("unet", args.backbone, args.size)
        models.set_bn_momentum(model, 0.9)
        models.compile_model(model, models.keras.optimizers.Adam(1e-3), {"dice": 1, "bce": 1})
        base, _ = make_train_dataset(
            train.images,
            train.masks,
            SeededAugmenter(pipeline),
            args.backbone,
            FitSettings(epochs=10_000, batch_size=args.batch),
        )
        datasets = {name: base if opts is None else base.with_options(opts) for name, opts in variants(tf).items()}
        prep = models.preprocessing(args.backbone)
        x = prep(train.images[: args.batch].astype(np.float32)).astype(np.float32)
        y = train.masks[: args.batch, :, :, None].astype(np.float32)
        datasets["in memory (one fixed batch: the bound)"] = tf.data.Dataset.from_tensors((x, y)).repeat()
        for ds in datasets.values():  # warm-up (the first traces the training step)
            model.fit(ds, steps_per_epoch=2, epochs=1, verbose=0)
        names = list(datasets)
        rates: dict[str, list[float]] = {n: [] for n in names}
        for r in range(args.rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                t0 = time.perf_counter()
                model.fit(datasets[name], steps_per_epoch=args.steps, epochs=1, verbose=0)
                rates[name].append(args.steps * args.batch / (time.perf_counter() - t0))
            print(f"round {r}: " + ", ".join(f"{n}: {rates[n][-1]:.1f}" for n in names), flush=True)
        segx_name = names[0]
        ratios = {n: [rates[n][r] / rates[segx_name][r] for r in range(args.rounds)] for n in names}
        results = {
            "command": "python experiments/tfdata_options.py " + " ".join(sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "cores": os.cpu_count(),
            "backbone": args.backbone,
            "size": args.size,
            "batch": args.batch,
            "steps": args.steps,
            "cases": len(train.images),
            "rates": rates,
            "ratios": ratios,
        }
        write_results(OUT, results)
    lines = [
        "# tf.data options on segx's training pipeline",
        "",
        f"`{results['command']}` ({results['date']}, {results['cores']} CPU cores). {args.backbone} U-Net at {args.size} px, "
        f"batch {args.batch}, {results['cases']} DSB2018 training cases, augment=strong; {args.steps} training steps per "
        f"variant per round, {args.rounds} rounds in rotated order; median (min-max) over rounds.",
        "",
        "| pipeline | training img/s | / segx's pipeline |",
        "|---|---|---|",
    ]
    for n in names:
        lines.append(f"| {n} | {spread(rates[n], 1)} | {spread(ratios[n], 3)} |")
    text = "\n".join(lines) + "\n"
    write_results(OUT, report=text)
    print(text)


if __name__ == "__main__":
    main()
