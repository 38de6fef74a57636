"""The DSB2018 study: accuracy of members and ensembles, and where the time goes.

    python -m segx.bench                  # full study -> experiments/dsb2018/RESULTS.md
    python -m segx.bench profile=quick    # every stage on a subset, in minutes
    python -m segx.bench stages='[throughput]'   # one stage again

Each stage writes ``<results_dir>/<stage>.json`` as soon as it finishes and RESULTS.md is
rebuilt from whatever stages exist, so a failed stage never discards earlier measurements.
Everything is also logged to one MLflow run (``segx.role=bench``).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import hydra
import numpy as np
import pandas as pd
from omegaconf import DictConfig

from segx import cli
from segx.errors import SegxError

log = logging.getLogger("segx.bench")
STAGES = ("accuracy", "throughput", "efficiency", "inference", "search")
ANCHORS = [
    ("U-Net, pytorch-nested-unet README", "96x96, own split, Lovász loss, from scratch, GPU", "IoU 0.839 (Dice ~0.912)"),
    ("UNet++ (deep supervision), same source", "96x96, same setting", "IoU 0.843"),
    ("DoubleU-Net (Jha et al. 2020)", "ImageNet VGG19 encoder, 256x256", "Dice ~0.913 (recalled, unverified)"),
]


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from segx.provenance import package_versions

    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), **package_versions()}


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


def subset_folder(root: Path, n: int | None, work: Path) -> Path:
    """``root`` itself, or a folder of symlinks to a stratified subset of ``n`` cases."""
    if not n:
        return root
    meta = pd.read_csv(root / "metadata.csv")
    rng = np.random.default_rng(0)
    parts = []
    for _, group in meta.groupby("appearance"):
        keep = max(2, round(n * len(group) / len(meta)))
        parts.append(group.iloc[rng.permutation(len(group))[:keep]])
    picked = pd.concat(parts)
    target = work / f"subset-{n}"
    for sub in ("train_images", "train_masks"):
        (target / sub).mkdir(parents=True, exist_ok=True)
    for stem in picked["stem"]:
        for sub in ("train_images", "train_masks"):
            link = target / sub / f"{stem}.png"
            if not link.exists():
                link.symlink_to((root / sub / f"{stem}.png").resolve())
    picked.to_csv(target / "metadata.csv", index=False)
    return target


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
        (self.results / f"{stage}.json").write_text(json.dumps(payload, indent=1, default=float))
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
        from segx.ensemble import build_ensemble
        from segx.models import clear_session
        from segx.train import config_identity, train_member

        data_root = subset_folder(self.dataset, self.profile.max_cases, self.work)
        client = tracking.connect(str(self.cfg.mlflow.tracking_uri))
        experiment = tracking.experiment_id(client, str(self.cfg.mlflow.experiment_name), self.cfg.mlflow.artifact_root)
        members = []
        for backbone in self.profile.members:
            train_cfg = compose("train", overrides=[*self.train_overrides(data_root), f"backbone={backbone}"])
            identity = config_identity(train_cfg)
            done = tracking.find_runs(client, experiment, "member", "FINISHED", {"segx.config_hash": identity})
            if done and self.cfg.reuse_members:
                run = done[0]
                print(f"segx bench: reusing {backbone} member {run.info.run_id}", flush=True)
            else:
                started = time.perf_counter()
                train_member(train_cfg)
                clear_session()
                run = tracking.find_runs(client, experiment, "member", "FINISHED", {"segx.config_hash": identity})[0]
                tracking.log_metrics(client, run.info.run_id, {"bench/train_seconds": time.perf_counter() - started})
            run = client.get_run(run.info.run_id)
            history = client.get_metric_history(run.info.run_id, "val/dice")
            members.append({
                "backbone": backbone, "run_id": run.info.run_id,
                "best_val_dice": run.data.metrics.get("best/val_dice"),
                "epochs_run": len(history),
                "train_seconds": run.data.metrics.get("bench/train_seconds"),
            })  # fmt: skip
        ens_cfg = compose("ensemble", overrides=[
            f"paths.output_dir={self.cfg.paths.output_dir}",
            f"mlflow.tracking_uri={self.cfg.mlflow.tracking_uri}",
            f"mlflow.experiment_name={self.cfg.mlflow.experiment_name}",
            "ensemble.run_ids=[" + ",".join(m["run_id"] for m in members) + "]",
        ])  # fmt: skip
        record = build_ensemble(ens_cfg)
        folder = Path(tempfile.mkdtemp(prefix="segx-bench-"))
        per_case = pd.read_csv(tracking.download(client, record["run_id"], "tables/test_per_case.csv", folder))
        val = pd.read_csv(tracking.download(client, record["run_id"], "tables/val_summary.csv", folder))
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
            "members": members, "ensemble_run_id": record["run_id"],
            "weights": {m["backbone"]: m["weight"] for m in record["members"]},
            "threshold": record["threshold"], "postprocess": record["postprocess"],
            "chosen": record["search"]["chosen"], "val_table": val.to_dict(orient="records"),
            "test_table": table, "image_size": int(self.profile.image_size), "data_root": str(data_root),
        }  # fmt: skip

    def forced_postprocess(self, client, record: dict, folder: Path) -> pd.DataFrame:
        """Test rows for the ensemble with the best post-processing other than none, as chosen on
        validation, applied even if validation rejected it: post-processing on vs off."""
        from segx.ensemble import _member_from_run, _test_table, choose_postprocess

        members = [_member_from_run(client, client.get_run(m["run_id"]), folder / "cache", record.get("tta", "none"))
                   for m in record["members"]]  # fmt: skip
        weights = [m["weight"] for m in record["members"]]
        _, results = choose_postprocess(members, weights, record["threshold"], [10, 20, 50, 100], 0.0)
        post, val_dice = max((r for r in results if not r[0].is_identity), key=lambda r: r[1])
        rows, _ = _test_table(members, weights, record["threshold"], post)
        rows = rows[rows.method == "ensemble"].copy()
        rows["method"] = f"ensemble + {post.describe()} (forced on; val Dice {val_dice:.4f})"
        return rows

    def plot_accuracy(self, table: pd.DataFrame) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        cols = [c for c in table.columns if c.startswith("dice_") and c not in ("dice_mean", "dice_median", "dice_q25", "dice_q75")]
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
        from segx.augment import SeededAugmenter, build_augmentation
        from segx.backend import tf
        from segx.config import compose
        from segx.data.prepare import prepare
        from segx.training import make_train_dataset

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
            real, _ = make_train_dataset(train.images, train.masks, SeededAugmenter(pipeline), backbone, bs, 0, epochs=1000)
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
            rows.append({
                "backbone": backbone, "batch": bs, "image_size": size,
                "train_img_s_pipeline": float(np.median(timings["pipeline"])),
                "train_img_s_in_memory": float(np.median(timings["in_memory"])),
                "pipeline_over_memory": float(np.median(timings["pipeline"]) / np.median(timings["in_memory"])),
                "pipeline_alone_img_s": pipe_only, "infer_img_s": infer,
            })  # fmt: skip
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
            raise SegxError("the efficiency stage needs the throughput stage's results; run stages='[throughput,efficiency]'")
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
            "backbone": row["backbone"], "image_size": size, "forward_gflop_per_image": forward / 1e9,
            "matmul_gflops_tf": tf_peak / 1e9, "matmul_gflops_numpy": np_peak / 1e9,
            "train_gflops_achieved": train_flops * row["train_img_s_in_memory"] / 1e9,
            "train_fraction_of_peak": train_flops * row["train_img_s_in_memory"] / peak,
            "train_fraction_of_peak_pipeline": train_flops * row["train_img_s_pipeline"] / peak,
            "infer_gflops_achieved": forward * row["infer_img_s"] / 1e9,
            "infer_fraction_of_peak": forward * row["infer_img_s"] / peak,
        }  # fmt: skip

    # --- stage 4 ---------------------------------------------------------------------------------
    def inference(self) -> dict:
        from segx import tracking
        from segx.data.folder import discover_cases
        from segx.data.io import read_image
        from segx.predict import load_ensemble, predict_folder
        from segx.predictor import EnsemblePredictor

        accuracy = self.load("accuracy")
        if not accuracy:
            raise SegxError("the inference stage needs the accuracy stage's ensemble; run it first")
        client = tracking.connect(str(self.cfg.mlflow.tracking_uri))
        work = self.work / "inference"
        record, ensemble = load_ensemble(client, accuracy["ensemble_run_id"], work / "models")
        # Time every member, even those the search gave weight 0, so the sum is the full cost.
        full = {**record, "members": [dict(m, weight=1.0 / len(record["members"])) for m in record["members"]]}
        model_dirs = [work / "models" / f"m{i}" for i in range(len(record["members"]))]
        ensemble = EnsemblePredictor(full, model_dirs)
        singles = [EnsemblePredictor({**record, "members": [dict(m, weight=1.0)]}, [d]) for m, d in zip(record["members"], model_dirs, strict=True)]
        cases = discover_cases(self.dataset)[: int(self.profile.inference_timing_images)]
        images = [read_image(c.image) for c in cases]
        rows = {}
        for tta in ("none", "flip"):
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
                "sum_of_members_s": member_sum, "ensemble_s": timings["ensemble"],
                "overhead": timings["ensemble"] / member_sum - 1,
            }  # fmt: skip
        # Streaming memory: a folder of N images (symlinks cycling the dataset), predicted in batches.
        folder = work / f"folder-{self.profile.inference_images}"
        folder.mkdir(parents=True, exist_ok=True)
        every = discover_cases(self.dataset)
        for i in range(int(self.profile.inference_images)):
            link = folder / f"img{i:05d}.png"
            if not link.exists():
                link.symlink_to(every[i % len(every)].image.resolve())
        out_dir = Path(tempfile.mkdtemp(prefix="segx-bench-pred-"))
        samples = []
        ensemble.tta = record.get("tta", "none")
        t0 = time.perf_counter()
        n = predict_folder(ensemble, folder, out_dir, 8, overlays=False, uncertainty=True, save_probabilities=False,
                           on_batch=lambda done: samples.append((done, rss_mb())))  # fmt: skip
        elapsed = time.perf_counter() - t0
        marks = {}
        for frac in (0.1, 0.5, 1.0):
            target = frac * n
            marks[f"rss_mb_at_{int(frac * 100)}pct"] = next(r for d, r in samples if d >= target)
        return {"timing_images": len(images), "tta": rows, "folder_images": n, "folder_seconds": elapsed,
                "folder_img_s": n / elapsed, **marks}  # fmt: skip

    # --- stage 5 ---------------------------------------------------------------------------------
    def search(self) -> dict:
        from segx import search, tracking
        from segx.probs import load_cached

        accuracy = self.load("accuracy")
        if not accuracy:
            raise SegxError("the search stage needs the accuracy stage's members; run it first")
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))
        from search_benchmark import naive_grid

        client = tracking.connect(str(self.cfg.mlflow.tracking_uri))
        cached = []
        for m in accuracy["members"]:
            folder = self.work / "search" / m["run_id"]
            cached.append(load_cached(tracking.download(client, m["run_id"], "predictions/val.npz", folder), folder))
        probs, truth = [c.probs for c in cached], cached[0].masks
        thresholds = [round(0.3 + 0.05 * i, 2) for i in range(9)]
        out = {"cases": len(truth), "size": int(truth.shape[-1]), "members": len(probs)}
        t0 = time.perf_counter()
        data = search.compact(probs, truth, thresholds)
        out["compact_s"] = time.perf_counter() - t0
        out["kept_pixel_fraction"] = data.kept_fraction
        for name, fn in (("greedy", search.search_greedy), ("grid", lambda d: search.search_grid(d, 0.1)),
                         ("optimize", search.search_optimize)):  # fmt: skip
            t0 = time.perf_counter()
            result = fn(data)
            out[f"{name}_s"] = time.perf_counter() - t0 + out["compact_s"]
            out[f"{name}_dice"] = result.best.val_dice
        t0 = time.perf_counter()
        dice, _, combos = naive_grid(np.stack([np.asarray(p, np.float32) / 255 for p in probs]), truth)
        out["naive_s"], out["naive_dice"], out["naive_combos"] = time.perf_counter() - t0, dice, combos
        out["speedup_greedy"] = out["naive_s"] / out["greedy_s"]
        out["speedup_grid"] = out["naive_s"] / out["grid_s"]
        return out


def _fmt(v, digits=4):
    return "n/a" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.{digits}f}"


def load_stage(results: Path, stage: str) -> dict | None:
    """A stage's saved results, or None if it has not run (or failed)."""
    path = results / f"{stage}.json"
    return json.loads(path.read_text()) if path.exists() else None


def write_report(results: Path, profile) -> None:
    """RESULTS.md from the stage files present."""

    def load(stage):
        return load_stage(results, stage)

    env = load("machine") or {}
    lines = [f"# DSB2018 nuclei: segx study ({profile.name} profile)", "",
             f"Reproduce: `python -m segx.bench{' profile=quick' if profile.name == 'quick' else ''}` "
             f"(`make bench{'-quick' if profile.name == 'quick' else ''}`). Data read in place from "
             "`../shared/datasets/dsb2018_nuclei` (664 images; 541 fluorescence, 123 brightfield/H&E).", ""]  # fmt: skip
    if env:
        lines += [f"Machine: {env.get('cpu')}, {env.get('cores')} cores; TensorFlow {env.get('tensorflow')}, "
                  f"tf-keras {env.get('tf-keras')}, segmentation-models {env.get('segmentation-models')}, numpy {env.get('numpy')}, "
                  f"Python {env.get('python')}. Every ratio below was measured within one run, side by side.", ""]  # fmt: skip
    acc = load("accuracy")
    if acc:
        lines += ["## 1. Accuracy (test split, never seen by training or the search)", "",
                  f"Input {acc['image_size']}x{acc['image_size']} (resized), random init (no pretraining), "
                  "`augment=strong`, split 70/15/15 stratified by appearance (`data.split_seed=0`). "
                  f"Ensemble: weights {acc['weights']}, threshold {acc['threshold']}, chosen '{acc['chosen']}', "
                  f"post-processing {acc['postprocess']}; ensemble run `{acc['ensemble_run_id']}`.", "",
                  "| members | run | best val Dice | epochs | train time (s) |", "|---|---|---|---|---|"]  # fmt: skip
        for m in acc["members"]:
            lines.append(f"| {m['backbone']} | `{m['run_id'][:8]}` | {_fmt(m['best_val_dice'])} | {m['epochs_run']} | {_fmt(m['train_seconds'], 0)} |")
        apps = sorted({k.removeprefix("dice_") for r in acc["test_table"] for k in r if k.startswith("dice_") and k.removeprefix("dice_") not in ("mean", "median", "q25", "q75")})
        # Members, equal weights and majority vote are scored on test at 0.5 (no test-time choice
        # was made for them), the ensemble at its validation-chosen threshold: the column says so.
        head = "| method | threshold | Dice mean | Dice median | Dice IQR | IoU mean | HD95 mean (px) | HD95 median | " + " | ".join(f"Dice {a}" for a in apps) + " |"
        lines += ["Test rows: members, equal weights and majority vote at threshold 0.5; the ensemble at the "
                  "threshold chosen on validation (so 'equal-weights' here differs from the validation row "
                  "of the same name, which is at its best validation threshold).", "",
                  head, "|" + "---|" * (8 + len(apps))]  # fmt: skip
        for r in acc["test_table"]:
            threshold = acc["threshold"] if r["method"].startswith("ensemble") else 0.5
            lines.append(
                f"| {r['method']} | {threshold} | {_fmt(r['dice_mean'])} | {_fmt(r['dice_median'])} | {_fmt(r['dice_q25'], 3)}-{_fmt(r['dice_q75'], 3)} | "
                f"{_fmt(r['iou_mean'])} | {_fmt(r['hd95_mean'], 2)} | {_fmt(r['hd95_median'], 2)} | "
                + " | ".join(f"{_fmt(r.get('dice_' + a))} (n={r.get('n_' + a, 0)})" for a in apps) + " |"
            )
        lines += ["", "Validation (where weights, threshold and post-processing were chosen):", "",
                  "| method | val Dice | threshold |", "|---|---|---|"]  # fmt: skip
        for r in acc["val_table"]:
            lines.append(f"| {r['method']} | {_fmt(r['val_dice'])} | {r['threshold']} |")
        lines += ["", "Published anchors (different settings, so not like for like):", "",
                  "| source | setting | figure |", "|---|---|---|"]
        lines += [f"| {a} | {b} | {c} |" for a, b, c in ANCHORS]
        lines += ["", "![accuracy](accuracy.png)", ""]
    thr = load("throughput")
    if thr:
        lines += ["## 2. Training throughput: real input pipeline vs tensors already in memory", "",
                  f"Same model, same step; the pipeline decodes nothing (images are held in memory at model size) but runs "
                  f"`augment={thr['augment']}` and the encoder's preprocessing in tf.data worker threads. Median of 3 alternating timings of {thr['steps']} steps, TF op determinism on (the training default).", "",
                  "| member | pipeline img/s | in-memory img/s | pipeline / in-memory | pipeline alone img/s | inference img/s |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for r in thr["rows"]:
            lines.append(f"| {r['backbone']} | {_fmt(r['train_img_s_pipeline'], 1)} | {_fmt(r['train_img_s_in_memory'], 1)} | "
                         f"{_fmt(r['pipeline_over_memory'], 3)} | {_fmt(r['pipeline_alone_img_s'], 1)} | {_fmt(r['infer_img_s'], 1)} |")  # fmt: skip
        lines.append("")
    eff = load("efficiency")
    if eff:
        lines += ["## 3. Compute efficiency", "",
                  f"{eff['backbone']} Unet at {eff['image_size']} px: {eff['forward_gflop_per_image']:.3f} GFLOP per image forward "
                  "(TF profiler), training counted as 3x forward. Peak = float32 2048x2048 matmul measured in the same run "
                  f"(TF {eff['matmul_gflops_tf']:.1f} GFLOP/s, numpy {eff['matmul_gflops_numpy']:.1f} GFLOP/s; the higher is used).", "",
                  "| | achieved GFLOP/s | fraction of peak |", "|---|---|---|",
                  f"| training (in-memory) | {eff['train_gflops_achieved']:.1f} | {eff['train_fraction_of_peak']:.1%} |",
                  f"| training (real pipeline) | | {eff['train_fraction_of_peak_pipeline']:.1%} |",
                  f"| inference | {eff['infer_gflops_achieved']:.1f} | {eff['infer_fraction_of_peak']:.1%} |", ""]  # fmt: skip
    inf = load("inference")
    if inf:
        lines += ["## 4. Ensemble inference", "",
                  f"{inf['timing_images']} dataset images at their own sizes (read, resize, predict, combine, post-process, resize back); "
                  "the ensemble against each member alone through the same code path.", "",
                  "| TTA | ensemble img/s | members img/s | ensemble time / sum of members | overhead |", "|---|---|---|---|---|"]  # fmt: skip
        for tta, r in inf["tta"].items():
            members = ", ".join(f"{v:.1f}" for v in r["members_img_s"].values())
            lines.append(f"| {tta} | {r['ensemble_img_s']:.1f} | {members} | {r['ensemble_s']:.2f}s / {r['sum_of_members_s']:.2f}s | {r['overhead']:+.1%} |")
        lines += ["", f"Streaming a folder of {inf['folder_images']} images (`segx.predict` code path, batches of 8, masks and "
                  f"uncertainty maps written): {inf['folder_img_s']:.1f} img/s; resident memory "
                  f"{inf['rss_mb_at_10pct']:.0f} MiB after 10%, {inf['rss_mb_at_50pct']:.0f} MiB after 50%, "
                  f"{inf['rss_mb_at_100pct']:.0f} MiB at the end.", ""]  # fmt: skip
    se = load("search")
    if se:
        lines += ["## 5. Ensemble search on the real cached validation probabilities", "",
                  f"{se['members']} members, {se['cases']} validation cases at {se['size']} px; {se['kept_pixel_fraction']:.1%} of pixels "
                  "survive compaction.", "",
                  "| method | seconds | val Dice | speed-up vs naive |", "|---|---|---|---|",
                  f"| naive grid 0.1, threshold 0.5 ({se['naive_combos']} combos) | {se['naive_s']:.3f} | {se['naive_dice']:.4f} | 1 |",
                  f"| segx greedy (+ threshold search) | {se['greedy_s']:.4f} | {se['greedy_dice']:.4f} | x{se['speedup_greedy']:.0f} |",
                  f"| segx grid 0.1 (+ threshold search) | {se['grid_s']:.4f} | {se['grid_dice']:.4f} | x{se['speedup_grid']:.0f} |",
                  f"| segx optimize | {se['optimize_s']:.4f} | {se['optimize_dice']:.4f} | |", ""]  # fmt: skip
    notes = results / "NOTES.md"
    if notes.exists():
        lines += [notes.read_text()]
    (results / "RESULTS.md").write_text("\n".join(lines) + "\n")


def run_study(cfg: DictConfig) -> Path:
    study = Study(cfg)
    check_dataset(study.dataset)
    stages = list(cfg.stages)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise SegxError(f"unknown stage '{unknown[0]}'; stages are {', '.join(STAGES)}")
    study.results.mkdir(parents=True, exist_ok=True)
    (study.results / "machine.json").write_text(json.dumps(machine(), indent=1))
    from segx import tracking
    from segx.provenance import provenance_tags

    client = tracking.connect(str(cfg.mlflow.tracking_uri))
    experiment = tracking.experiment_id(client, str(cfg.mlflow.experiment_name), cfg.mlflow.artifact_root)
    run_id = tracking.start_run(client, experiment, f"bench-{cfg.profile.name}", {tracking.ROLE: "bench", **provenance_tags()})
    failures = []
    with tracking.run_scope(client, run_id):
        for stage in stages:
            print(f"segx bench: stage '{stage}'", flush=True)
            t0 = time.perf_counter()
            try:
                payload = getattr(study, stage)()
            except SegxError as exc:
                failures.append(f"{stage}: {exc}")
                print(f"segx bench: stage '{stage}' failed: {exc}", file=sys.stderr, flush=True)
                continue
            except Exception as exc:  # keep the stages already measured, report, go on
                logging.exception("stage %s failed", stage)
                failures.append(f"{stage}: {type(exc).__name__}: {exc}")
                continue
            payload["stage_seconds"] = time.perf_counter() - t0
            study.save(stage, payload)
            tracking.log_artifact(client, run_id, study.results)
        tracking.log_artifact(client, run_id, study.results)
        if failures:
            tracking.set_tags(client, run_id, {"segx.failed_stages": "; ".join(failures)[:4000]})
    print(f"segx bench: wrote {study.results / 'RESULTS.md'}" + (f"; {len(failures)} stage(s) failed" if failures else ""), flush=True)
    if failures:
        raise SegxError("stage(s) failed: " + " | ".join(failures))
    return study.results / "RESULTS.md"


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench")
@cli.task
def _hydra_main(cfg: DictConfig) -> None:
    run_study(cfg)


def main() -> None:
    cli.run(_hydra_main, "bench")


if __name__ == "__main__":
    main()
