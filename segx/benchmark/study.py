"""The stages of the DSB2018 study, each a method of :class:`Study` that returns the numbers it
measured (saved to ``<results_dir>/<stage>.json`` by the caller): accuracy (members and the
ensemble on the test split), training throughput, compute efficiency, ensemble inference, and
the search on real cached probabilities."""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from segx.benchmark import helpers
from segx.benchmark.helpers import subset_folder, write_results
from segx.benchmark.naive import naive_grid
from segx.benchmark.report import load_stage, write_report
from segx.config import TTA_MODES
from segx.errors import SegxError

if TYPE_CHECKING:
    from segx.ensembling.record import EnsembleRecord

STAGES = ("accuracy", "throughput", "efficiency", "inference", "search")


def machine() -> dict:
    """:func:`segx.benchmark.helpers.machine` with the versions segx records for its runs."""
    from segx.tracking.provenance import package_versions

    return {**helpers.machine(), **package_versions()}


def rss_mb() -> float:
    """Current resident memory of this process, in MiB."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def check_dataset(root: Path) -> None:
    from segx.data.folder import discover_cases

    if not root.is_dir():
        raise SegxError(f"benchmark dataset {root} does not exist; set dataset=PATH (see ../shared/datasets/README.md)")
    discover_cases(root)  # raises with the layout problem named
    if not (root / "metadata.csv").is_file():
        raise SegxError(f"{root}/metadata.csv is missing; the study needs its 'appearance' column")


class Study:
    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.profile = cfg.profile
        self.results = Path(str(self.profile.results_dir))
        self.results.mkdir(parents=True, exist_ok=True)
        self.work = Path(cfg.paths.output_dir) / "bench"
        self.work.mkdir(parents=True, exist_ok=True)
        self.dataset = Path(str(cfg.dataset))

    # --- bookkeeping -------------------------------------------------------------------------
    def save(self, stage: str, payload: dict) -> None:
        payload = {"stage": stage, "finished": time.strftime("%Y-%m-%d %H:%M:%S"), **payload}
        write_results(self.results, payload, name=f"{stage}.json")
        write_report(self.results, self.profile)
        print(f"segx bench: stage '{stage}' done -> {self.results / (stage + '.json')}", flush=True)

    def load(self, stage: str) -> dict | None:
        return load_stage(self.results, stage)

    def train_overrides(self, data_root: Path) -> list[str]:
        p, cfg = self.profile, self.cfg
        return [
            "experiment=dsb2018",
            f"data.root={data_root}",
            f"data.image_size={p.image_size}",
            f"trainer.epochs={p.epochs}",
            f"trainer.batch_size={p.batch_size}",
            f"paths.output_dir={cfg.paths.output_dir}",
            f"mlflow.tracking_uri={cfg.mlflow.tracking_uri}",
            f"mlflow.artifact_root={cfg.mlflow.artifact_root}",
            f"mlflow.experiment_name={cfg.mlflow.experiment_name}",
        ]

    # --- stage 1 ---------------------------------------------------------------------------------
    def accuracy(self) -> dict:
        from segx import tracking
        from segx.config import compose
        from segx.models import clear_session
        from segx.workflows.ensemble import build_ensemble
        from segx.workflows.member import config_identity, train_member

        data_root = subset_folder(self.dataset, self.profile.max_cases, self.work)
        client = tracking.connect(str(self.cfg.mlflow.tracking_uri))
        experiment = tracking.experiment_id(client, str(self.cfg.mlflow.experiment_name), self.cfg.mlflow.artifact_root)
        members = []
        for backbone in self.profile.members:
            member_overrides = [*self.train_overrides(data_root), f"backbone={backbone}"]
            train_cfg = compose("train", overrides=member_overrides)
            identity = config_identity(train_cfg)
            done = tracking.find_runs(client, experiment, "member", "FINISHED", {"segx.config_hash": identity})
            if done and self.cfg.reuse_members:
                run = done[0]
                print(f"segx bench: reusing {backbone} member {run.info.run_id}", flush=True)
            else:
                started = time.perf_counter()
                train_member(train_cfg, member_overrides)
                clear_session()
                run = tracking.find_runs(client, experiment, "member", "FINISHED", {"segx.config_hash": identity})[0]
                tracking.log_metrics(client, run.info.run_id, {"bench/train_seconds": time.perf_counter() - started})
            run = client.get_run(run.info.run_id)
            history = client.get_metric_history(run.info.run_id, "curves/val_dice")
            members.append(
                {
                    "backbone": backbone,
                    "run_id": run.info.run_id,
                    "best_val_dice": run.data.metrics.get("curves/best_val_dice"),
                    "epochs_run": len(history),
                    "train_seconds": run.data.metrics.get("bench/train_seconds"),
                }
            )
        ens_cfg = compose(
            "ensemble",
            overrides=[
                f"paths.output_dir={self.cfg.paths.output_dir}",
                f"mlflow.tracking_uri={self.cfg.mlflow.tracking_uri}",
                f"mlflow.experiment_name={self.cfg.mlflow.experiment_name}",
                "ensemble.run_ids=[" + ",".join(m["run_id"] for m in members) + "]",
            ],
        )
        record = build_ensemble(ens_cfg)
        folder = self.work / "accuracy" / record.run_id  # under the study's own work folder, not /tmp
        per_case = pd.read_csv(tracking.download(client, record.run_id, "tables/test_per_case.csv", folder))
        val = pd.read_csv(tracking.download(client, record.run_id, "tables/val_summary.csv", folder))
        per_case = pd.concat([per_case, self.forced_postprocess(client, record, folder)], ignore_index=True)
        meta = pd.read_csv(data_root / "metadata.csv")[["stem", "appearance"]]
        per_case = per_case.merge(meta, on="stem", how="left")
        per_case.to_csv(self.results / "test_per_case.csv", index=False)
        table = []
        for method, g in per_case.groupby("method", sort=False):
            row = {"method": method, "cases": len(g)}
            for metric in ("dice", "iou", "hd95"):
                row[f"{metric}_mean"] = g[metric].mean()
                row[f"{metric}_median"] = g[metric].median()
                row[f"{metric}_q25"] = g[metric].quantile(0.25)
                row[f"{metric}_q75"] = g[metric].quantile(0.75)
            for appearance, ga in g.groupby("appearance"):
                row[f"dice_{appearance}"] = ga["dice"].mean()
                row[f"n_{appearance}"] = len(ga)
            table.append(row)
        pd.DataFrame(table).to_csv(self.results / "test_summary.csv", index=False)
        self.plot_accuracy(pd.DataFrame(table))
        return {
            "members": members,
            "ensemble_run_id": record.run_id,
            "weights": {m.backbone: m.weight for m in record.members},
            "threshold": record.threshold,
            "postprocess": record.postprocess.to_dict(),
            "chosen": record.chosen_method,
            "val_table": val.to_dict(orient="records"),
            "test_table": table,
            "image_size": int(self.profile.image_size),
            "data_root": str(data_root),
            "scored_at": "original size",
        }

    def forced_postprocess(self, client, record: EnsembleRecord, folder: Path) -> pd.DataFrame:
        """Test rows for the ensemble with the best post-processing other than none, as chosen on
        validation, applied even if validation rejected it: post-processing on vs off."""
        import dataclasses

        from segx.ensembling.task import choose_postprocess
        from segx.evaluation.report import score_test_split
        from segx.workflows.members import load_member

        members = [load_member(client, client.get_run(m.run_id), folder / "cache", record.tta) for m in record.members]
        weights = record.weights  # the exact counts, as prediction uses them
        probs, truth = [m.val.probs for m in members], members[0].val.masks
        _, results = choose_postprocess(probs, truth, weights, record.threshold, [10, 20, 50, 100], 0.0)
        post, val_dice = max((r for r in results if not r[0].is_identity), key=lambda r: r[1])
        rows, _ = score_test_split(members, dataclasses.replace(record, postprocess=post))
        rows = rows[rows.method == "ensemble"].copy()
        rows["method"] = f"ensemble + {post.describe()} (forced on; val Dice {val_dice:.4f})"
        return rows

    def plot_accuracy(self, table: pd.DataFrame) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        cols = [
            c
            for c in table.columns
            if c.startswith("dice_") and c not in ("dice_mean", "dice_median", "dice_q25", "dice_q75")
        ]
        fig, ax = plt.subplots(figsize=(9, 4))
        x = np.arange(len(table))
        width = 0.8 / (1 + len(cols))
        ax.bar(x, table["dice_mean"], width, label="all")
        for i, c in enumerate(cols):
            ax.bar(x + (i + 1) * width, table[c], width, label=c.removeprefix("dice_"))
        ax.set_xticks(x + width * len(cols) / 2, table["method"], rotation=25, ha="right", fontsize=8)
        ax.set_ylabel("test Dice (mean per case)")
        ax.set_ylim(max(0, float(table["dice_mean"].min()) - 0.15), 1)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        fig.savefig(self.results / "accuracy.png", dpi=100)
        plt.close(fig)

    # --- stage 2 ---------------------------------------------------------------------------------
    def throughput(self) -> dict:
        import segx.backend  # noqa: F401
        from segx import models
        from segx.backend import tf
        from segx.config import compose
        from segx.objects import build_augmentation
        from segx.training.augment import SeededAugmenter
        from segx.training.fit import make_train_dataset
        from segx.training.settings import FitSettings
        from segx.workflows.prepare import prepare

        data_root = subset_folder(self.dataset, self.profile.max_cases, self.work)
        train_cfg = compose("train", overrides=self.train_overrides(data_root))
        prepared = prepare(train_cfg.data, train_cfg.paths.output_dir)
        train = prepared.part("train")
        pipeline = build_augmentation(train_cfg.augment.transforms)
        bs, steps, size = int(self.profile.batch_size), int(self.profile.throughput_steps), int(self.profile.image_size)
        rows = []
        # As members train by default (trainer.deterministic=true); process-wide once set.
        models.set_determinism(0, True)
        for backbone in self.profile.members:
            models.clear_session()
            model = models.build_model("unet", backbone, size)
            models.set_bn_momentum(model, 0.9)
            models.compile_model(model, models.keras.optimizers.Adam(1e-3), {"dice": 1, "bce": 1})
            real, _ = make_train_dataset(
                train.images, train.masks, SeededAugmenter(pipeline), backbone, FitSettings(epochs=1000, batch_size=bs)
            )
            prep = models.preprocessing(backbone)
            x = prep(train.images[:bs].astype(np.float32)).astype(np.float32)
            y = train.masks[:bs, :, :, None].astype(np.float32)
            memory = tf.data.Dataset.from_tensors((x, y)).repeat()
            timings = {"pipeline": [], "in_memory": []}
            for ds in (real, memory):
                model.fit(ds, steps_per_epoch=3, epochs=1, verbose=0)  # trace and warm up
            for _ in range(3):  # alternate, so drift on a noisy machine hits both alike
                for name, ds in (("pipeline", real), ("in_memory", memory)):
                    t0 = time.perf_counter()
                    model.fit(ds, steps_per_epoch=steps, epochs=1, verbose=0)
                    timings[name].append(steps * bs / (time.perf_counter() - t0))
            # Inference throughput of the same network (model(x), batch 8, no augmentation).
            batch = train.images[:8]
            models.predict_probs(model, batch, backbone)
            t0 = time.perf_counter()
            reps = max(3, steps // 2)
            for _ in range(reps):
                models.predict_probs(model, batch, backbone)
            infer = reps * len(batch) / (time.perf_counter() - t0)
            # And the input pipeline alone, with no model: can it outrun the model?
            t0 = time.perf_counter()
            for _ in real.take(steps):
                pass
            pipe_only = steps * bs / (time.perf_counter() - t0)
            rows.append(
                {
                    "backbone": backbone,
                    "batch": bs,
                    "image_size": size,
                    "train_img_s_pipeline": float(np.median(timings["pipeline"])),
                    "train_img_s_in_memory": float(np.median(timings["in_memory"])),
                    "pipeline_over_memory": float(np.median(timings["pipeline"]) / np.median(timings["in_memory"])),
                    "pipeline_alone_img_s": pipe_only,
                    "infer_img_s": infer,
                }
            )
            print(f"segx bench: {backbone}: {rows[-1]}", flush=True)
        return {"rows": rows, "augment": "strong", "steps": steps}

    # --- stage 3 ---------------------------------------------------------------------------------
    def efficiency(self) -> dict:
        import segx.backend  # noqa: F401
        from segx import models
        from segx.backend import tf

        size = int(self.profile.image_size)
        throughput = self.load("throughput")
        if not throughput:
            raise SegxError(
                "the efficiency stage needs the throughput stage's results; run stages='[throughput,efficiency]'"
            )
        row = throughput["rows"][0]
        models.clear_session()
        model = models.build_model("unet", row["backbone"], size)
        forward = models.count_flops(model, size)
        n = 2048
        a = tf.random.normal((n, n))
        b = tf.random.normal((n, n))
        tf.matmul(a, b).numpy()
        t0 = time.perf_counter()
        reps = 10
        for _ in range(reps):
            c = tf.matmul(a, b)
        c.numpy()
        tf_peak = 2 * n**3 * reps / (time.perf_counter() - t0)
        an, bn = np.random.rand(n, n).astype(np.float32), np.random.rand(n, n).astype(np.float32)
        an @ bn
        t0 = time.perf_counter()
        for _ in range(reps):
            an @ bn
        np_peak = 2 * n**3 * reps / (time.perf_counter() - t0)
        peak = max(tf_peak, np_peak)
        train_flops = 3 * forward  # forward + backward (about twice the forward)
        return {
            "backbone": row["backbone"],
            "image_size": size,
            "forward_gflop_per_image": forward / 1e9,
            "matmul_gflops_tf": tf_peak / 1e9,
            "matmul_gflops_numpy": np_peak / 1e9,
            "train_gflops_achieved": train_flops * row["train_img_s_in_memory"] / 1e9,
            "train_fraction_of_peak": train_flops * row["train_img_s_in_memory"] / peak,
            "train_fraction_of_peak_pipeline": train_flops * row["train_img_s_pipeline"] / peak,
            "infer_gflops_achieved": forward * row["infer_img_s"] / 1e9,
            "infer_fraction_of_peak": forward * row["infer_img_s"] / peak,
        }

    # --- stage 4 ---------------------------------------------------------------------------------
    def inference(self) -> dict:
        from segx import tracking
        from segx.data.folder import discover_cases
        from segx.data.io import read_image
        from segx.inference.folder import Batching, PredictOutputs, predict_folder
        from segx.inference.predictor import EnsemblePredictor
        from segx.workflows.predict import load_ensemble

        accuracy = self.load("accuracy")
        if not accuracy:
            raise SegxError("the inference stage needs the accuracy stage's ensemble; run it first")
        client = tracking.connect(str(self.cfg.mlflow.tracking_uri))
        work = self.work / "inference"
        record, ensemble = load_ensemble(client, accuracy["ensemble_run_id"], work / "models")
        # Time every member, even those the search gave weight 0, so the sum is the full cost.
        # (Equal weights as exact counts: a float weight beside the searched weight_count would be refused.)
        n_members = len(record.members)
        full = replace(
            record,
            members=tuple(replace(m, weight=1.0 / n_members, weight_count=1) for m in record.members),
            weight_denominator=n_members,
        )
        model_dirs = [work / "models" / f"m{i}" for i in range(n_members)]
        ensemble = EnsemblePredictor(full, model_dirs)
        singles = [
            EnsemblePredictor(
                replace(record, members=(replace(m, weight=1.0, weight_count=1),), weight_denominator=1), [d]
            )
            for m, d in zip(record.members, model_dirs, strict=True)
        ]
        cases = discover_cases(self.dataset)[: int(self.profile.inference_timing_images)]
        images = [read_image(c.image) for c in cases]
        rows = {}
        for tta in TTA_MODES:
            for p in (ensemble, *singles):
                p.tta = tta
            timings = {}
            for name, predictor in (("ensemble", ensemble), *((f"member{i}", s) for i, s in enumerate(singles))):
                predictor.predict(images[:8])  # warm up
                t0 = time.perf_counter()
                for start in range(0, len(images), 8):
                    predictor.predict(images[start : start + 8])
                timings[name] = time.perf_counter() - t0
            member_sum = sum(v for k, v in timings.items() if k.startswith("member"))
            rows[tta] = {
                "ensemble_img_s": len(images) / timings["ensemble"],
                "members_img_s": {k: len(images) / v for k, v in timings.items() if k != "ensemble"},
                "sum_of_members_s": member_sum,
                "ensemble_s": timings["ensemble"],
                "overhead": timings["ensemble"] / member_sum - 1,
            }
        # Streaming memory: a folder of N images (symlinks cycling the dataset), predicted in batches.
        folder = work / f"folder-{self.profile.inference_images}"
        folder.mkdir(parents=True, exist_ok=True)
        every = discover_cases(self.dataset)
        for i in range(int(self.profile.inference_images)):
            link = folder / f"img{i:05d}.png"
            if not link.exists():
                link.symlink_to(every[i % len(every)].image.resolve())
        out_dir = work / "predictions"
        shutil.rmtree(out_dir, ignore_errors=True)  # the previous timing's masks; this run rewrites them
        samples = []
        ensemble.tta = record.tta
        t0 = time.perf_counter()
        n = predict_folder(
            ensemble,
            folder,
            out_dir,
            PredictOutputs(uncertainty=True),
            Batching(8, on_batch=lambda done: samples.append((done, rss_mb()))),
        )
        elapsed = time.perf_counter() - t0
        marks = {}
        for frac in (0.1, 0.5, 1.0):
            target = frac * n
            marks[f"rss_mb_at_{int(frac * 100)}pct"] = next(r for d, r in samples if d >= target)
        return {
            "timing_images": len(images),
            "tta": rows,
            "folder_images": n,
            "folder_seconds": elapsed,
            "folder_img_s": n / elapsed,
            **marks,
        }

    # --- stage 5 ---------------------------------------------------------------------------------
    def search(self) -> dict:
        from segx import tracking
        from segx.ensembling import search
        from segx.ensembling.probs import load_cached

        accuracy = self.load("accuracy")
        if not accuracy:
            raise SegxError("the search stage needs the accuracy stage's members; run it first")
        client = tracking.connect(str(self.cfg.mlflow.tracking_uri))
        cached = []
        for m in accuracy["members"]:
            folder = self.work / "search" / m["run_id"]
            cached.append(load_cached(tracking.download(client, m["run_id"], "predictions/val.npz", folder), folder))
        probs, truth = [c.probs for c in cached], cached[0].masks
        thresholds = [round(0.3 + 0.05 * i, 2) for i in range(9)]
        out = {"cases": len(truth), "pixels": truth.n_pixels, "members": len(probs)}
        t0 = time.perf_counter()
        data = search.compact(probs, truth, thresholds)
        out["compact_s"] = time.perf_counter() - t0
        out["kept_pixel_fraction"] = data.kept_fraction
        for name, fn in (
            ("greedy", search.search_greedy),
            ("grid", lambda d: search.search_grid(d, 0.1)),
            ("optimize", search.search_optimize),
        ):
            t0 = time.perf_counter()
            result = fn(data)
            out[f"{name}_s"] = time.perf_counter() - t0 + out["compact_s"]
            out[f"{name}_dice"] = result.best.val_dice
        t0 = time.perf_counter()
        dice, _, combos = naive_grid(np.stack([np.asarray(p.flat, np.float32) / 255 for p in probs]), truth)
        out["naive_s"], out["naive_dice"], out["naive_combos"] = time.perf_counter() - t0, dice, combos
        out["speedup_greedy"] = out["naive_s"] / out["greedy_s"]
        out["speedup_grid"] = out["naive_s"] / out["grid_s"]
        return out
