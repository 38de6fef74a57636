"""Does patch-mode training memory stay flat as the dataset grows? Peak resident memory of
``python -m segx.train`` on folders of 100 and 1,000 large images (issue 10).

    python experiments/memory_flat.py [--work /tmp/segx-memflat] [--sizes 100,1000] [--side 1024]
                                      [--val 4] [--test 4] [--cleanup]

Generates ``--side`` x ``--side`` RGB PNGs with masks under ``--work`` (never in the repository):
smooth flat-coloured blobs, so they compress well on disk; the folder of N images holds hard
links to the first N of the largest folder. Every folder gets its own split file
(``data.split_file``) with the SAME ``--val`` validation and ``--test`` test cases (the first
stems): at the end of training a member predicts every validation and test case whole with the
sliding window, and that work is held fixed, so only the training set grows.

Each member trains in its own process (resnet18 Unet, 1 epoch, its own ``paths.output_dir``
and SQLite MLflow store under ``--work``); peak RSS is the child's ``ru_maxrss`` from
``os.wait4`` (the kernel's high-water mark, anonymous and file-backed pages together), and
``/proc/<pid>/status`` is sampled every 0.1 s for the split between anonymous memory (RssAnon)
and pages of memory-mapped files (RssFile: the decoded cache is read memory-mapped) and for the
peak of each phase (data preparation, training, whole-image validation/test prediction, told
apart by the lines the command prints).

Runs, in this order: patch mode on each folder with an empty decoded cache (decoding),
patch mode on each folder again with a fresh output folder but the same cache (cache hit), then
resize mode (``data.mode=resize data.image_size=64``) on each folder, reading the same cache.
Writes experiments/memory_flat/results.json (after each run) and RESULTS.md (rewrite it with
``--report-only``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from segx.benchmark.helpers import read_results, write_results

OUT = Path(__file__).resolve().parent / "memory_flat"
REPO = Path(__file__).resolve().parent.parent
MIB = 2**20


# ---------------------------------------------------------------------------------------- data


def blob_case(index: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """A deterministic RGB image with flat-coloured ellipses and its mask (some ellipses are
    foreground). Flat colours compress ~50x in PNG: 1,000 images take little disk."""
    import cv2

    rng = np.random.default_rng([index, 2026])
    image = np.empty((side, side, 3), np.uint8)
    image[:] = rng.integers(20, 90, 3)
    mask = np.zeros((side, side), np.uint8)
    for k in range(int(rng.integers(12, 30))):
        center = tuple(int(c) for c in rng.integers(0, side, 2))
        axes = tuple(int(a) for a in rng.integers(side // 60, side // 12, 2))
        angle = float(rng.uniform(0, 180))
        foreground = k % 3 != 2
        colour = tuple(int(c) for c in (rng.integers(150, 255, 3) if foreground else rng.integers(90, 150, 3)))
        cv2.ellipse(image, center, axes, angle, 0, 360, colour, -1, cv2.LINE_AA)
        cv2.ellipse(mask, center, axes, angle, 0, 360, 255 if foreground else 0, -1, cv2.LINE_8)
    return image, mask


def write_png(path: Path, array: np.ndarray) -> None:
    import cv2

    if array.ndim == 3:
        array = array[:, :, ::-1]  # OpenCV writes BGR
    ok, data = cv2.imencode(".png", array, [cv2.IMWRITE_PNG_COMPRESSION, 6])
    assert ok
    tmp = path.with_name(f".{path.name}.tmp")
    data.tofile(tmp)
    os.replace(tmp, path)


def make_data(work: Path, sizes: list[int], side: int, val: int, test: int) -> dict:
    """The folders and split files; reused when already complete (a marker records the settings)."""
    largest = max(sizes)
    full = work / "data" / f"n{largest}"
    stems = [f"case{i:04d}" for i in range(largest)]
    marker = work / "data" / "complete.json"
    settings = {"sizes": sizes, "side": side, "version": 1}
    if not (marker.exists() and json.loads(marker.read_text()) == settings):
        started = time.perf_counter()
        for sub in ("train_images", "train_masks"):
            (full / sub).mkdir(parents=True, exist_ok=True)
        for i, stem in enumerate(stems):
            image_path, mask_path = (
                full / "train_images" / f"{stem}.png",
                full / "train_masks" / f"{stem}.png",
            )
            if image_path.exists() and mask_path.exists():
                continue
            image, mask = blob_case(i, side)
            write_png(image_path, image)
            write_png(mask_path, mask)
            if (i + 1) % 100 == 0:
                print(
                    f"generated {i + 1}/{largest} cases ({time.perf_counter() - started:.0f} s)",
                    flush=True,
                )
        for n in sizes:
            folder = work / "data" / f"n{n}"
            if folder == full:
                continue
            shutil.rmtree(folder, ignore_errors=True)
            for sub in ("train_images", "train_masks"):
                (folder / sub).mkdir(parents=True)
                for stem in stems[:n]:
                    os.link(full / sub / f"{stem}.png", folder / sub / f"{stem}.png")
        marker.write_text(json.dumps(settings))
    splits = {}
    for n in sizes:
        # The same val and test cases for every folder: only the training set grows.
        split = {
            "train": stems[val + test : n],
            "val": stems[:val],
            "test": stems[val : val + test],
        }
        path = work / "splits" / f"n{n}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(split, indent=1))
        splits[n] = path
    png = sum(p.stat().st_size for p in (full / "train_images").iterdir())
    png_masks = sum(p.stat().st_size for p in (full / "train_masks").iterdir())
    return {"splits": splits, "png_mib_per_case": (png + png_masks) / largest / MIB}


def disk_usage(folder: Path) -> dict:
    """Bytes the files under ``folder`` take (apparent size and allocated blocks)."""
    apparent = allocated = files = 0
    for path in folder.rglob("*"):
        if path.is_file():
            stat = path.stat()
            apparent += stat.st_size
            allocated += stat.st_blocks * 512
            files += 1
    return {"apparent_mib": apparent / MIB, "allocated_mib": allocated / MIB, "files": files}


# ---------------------------------------------------------------------------------- measuring

# Lines the command prints between phases: after data preparation (the run is created), and
# Keras' end-of-epoch line (verbose=2) before the whole-image validation/test prediction.
PHASE_MARKERS = (("train", re.compile(r"segx: member run ")), ("predict", re.compile(r"loss: ")))


def _status(pid: int) -> dict[str, int] | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
            values[key] = int(rest.split()[0])  # kB
    return values if "VmRSS" in values else None


def measure(cmd: list[str], log_path: Path) -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
    lines: list[tuple[float, str]] = []
    samples: list[tuple[float, int, int, int, int]] = []  # (t, rss, anon, file, hwm) kB
    # ru_maxrss of the child starts at this process's RSS when it forks (Linux keeps the
    # high-water mark across exec): recorded so the reader can see it is far below the child's.
    driver = _status(os.getpid()) or {"VmRSS": 0}
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)

        def read() -> None:
            for line in proc.stdout:
                lines.append((time.perf_counter() - start, line.rstrip("\n")))
                log.write(line)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            values = _status(proc.pid)
            if values:
                samples.append(
                    (
                        time.perf_counter() - start,
                        values["VmRSS"],
                        values.get("RssAnon", 0),
                        values.get("RssFile", 0),
                        values.get("VmHWM", 0),
                    )
                )
            time.sleep(0.1)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        reader.join()
    if proc.returncode != 0:
        tail = "\n".join(line for _, line in lines[-30:])
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {proc.returncode}:\n{tail}")
    bounds = [("prepare", 0.0)]
    for phase, pattern in PHASE_MARKERS:
        hit = next((t for t, line in lines if pattern.search(line)), None)
        if hit is not None:
            bounds.append((phase, hit))
    phases = {}
    for i, (phase, t0) in enumerate(bounds):
        t1 = bounds[i + 1][1] if i + 1 < len(bounds) else float("inf")
        inside = [s for s in samples if t0 <= s[0] < t1]
        if inside:
            phases[phase] = {
                "seconds": (min(t1, wall) - t0),
                "max_rss_mib": max(s[1] for s in inside) / 1024,
                "max_anon_mib": max(s[2] for s in inside) / 1024,
                "max_file_mib": max(s[3] for s in inside) / 1024,
            }
    every = max(1, len(samples) // 400)  # a light time series for results.json
    return {
        "command": " ".join(cmd),
        "wall_s": wall,
        "peak_rss_mib": usage.ru_maxrss / 1024,  # Linux: kB
        "last_sampled_vmhwm_mib": max((s[4] for s in samples), default=0) / 1024,
        "driver_rss_mib": driver["VmRSS"] / 1024,
        "sampled_max_anon_mib": max((s[2] for s in samples), default=0) / 1024,
        "sampled_max_file_mib": max((s[3] for s in samples), default=0) / 1024,
        "phases": phases,
        "series": [
            [round(t, 1), round(r / 1024), round(a / 1024), round(f / 1024)] for t, r, a, f, _ in samples[::every]
        ],
        "log": str(log_path),
    }


PREPARE_CHILD = r"""
import json, time, tracemalloc
from omegaconf import OmegaConf
from segx.workflows.prepare import prepare

def status_mib(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024

data = OmegaConf.load("conf/data/folder.yaml")
cfg = OmegaConf.create({{"data": data}})
cfg.data.update({{"root": {root!r}, "mode": {mode!r}, "patch_size": 64, "image_size": 64,
                 "split_file": {split!r}, "cache_dir": {cache!r}}})
trace = {trace}
before = status_mib("VmRSS")
if trace:
    tracemalloc.start()
start = time.perf_counter()
prepared = prepare(cfg.data, {output!r})
seconds = time.perf_counter() - start
held, peak = tracemalloc.get_traced_memory() if trace else (0, 0)
print(json.dumps({{"seconds": seconds, "rss_before_mib": before, "rss_after_mib": status_mib("VmRSS"),
                  # VmHWM, not ru_maxrss: Linux carries the parent's RSS at fork into ru_maxrss.
                  "peak_rss_mib": status_mib("VmHWM"),
                  "traced_held_mib": held / 2**20, "traced_peak_mib": peak / 2**20,
                  "cases": len(prepared.decoded)}}))
"""


def prepare_only(mode: str, root: Path, split: Path, cache: Path, output: Path, trace: bool) -> dict:
    """``segx.workflows.prepare.prepare`` alone in a fresh process (no TensorFlow is imported): how
    long reading the folder takes and what the prepared data holds, without a network around it."""
    code = PREPARE_CHILD.format(
        root=str(root),
        mode=mode,
        split=str(split),
        cache=str(cache),
        output=str(output),
        trace=trace,
    )
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)
    if out.returncode != 0:
        raise SystemExit(f"prepare ({mode}, {root}) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def train_command(mode: str, root: Path, split: Path, cache: Path, output: Path) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "segx.train",
        "data=folder",
        f"data.root={root}",
        f"data.mode={mode}",
        "backbone=resnet18",
        "trainer.epochs=1",
        "trainer.verbose=2",
        f"data.split_file={split}",
        f"data.cache_dir={cache}",
        f"paths.output_dir={output}",
    ]
    if mode == "patch":
        cmd += ["data.patch_size=64", "data.samples_per_epoch=32"]
    else:
        cmd += ["data.image_size=64"]
    return cmd


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", default="/tmp/segx-memflat")
    parser.add_argument("--sizes", default="100,1000")
    parser.add_argument("--side", type=int, default=1024)
    parser.add_argument("--val", type=int, default=4)
    parser.add_argument("--test", type=int, default=4)
    parser.add_argument(
        "--stages",
        default="train,prepare",
        help="train (whole segx.train runs), prepare (data preparation alone)",
    )
    parser.add_argument(
        "--cleanup",
        action="store_true",
        help="delete the decoded caches and run folders at the end",
    )
    parser.add_argument("--report-only", action="store_true", help="rewrite RESULTS.md from results.json")
    args = parser.parse_args()
    if args.report_only:
        write_report()
        return
    from segx.benchmark.study import machine

    work = Path(args.work)
    sizes = sorted(int(n) for n in args.sizes.split(","))
    stages = args.stages.split(",")
    # Decoded cache: 4 bytes per pixel (RGB + mask) per case, for every folder, plus one more
    # of the largest folder decoded afresh by the prepare stage; PNGs are small.
    need = (sum(sizes) + max(sizes)) * args.side**2 * 4 * 1.05 + max(sizes) * 0.5 * MIB
    free = shutil.disk_usage(work.parent if not work.exists() else work).free
    if free < 1.5 * need:
        raise SystemExit(f"{work}: {free / 2**30:.1f} GiB free, this needs about {need / 2**30:.1f} GiB (x1.5 margin)")
    data = make_data(work, sizes, args.side, args.val, args.test)
    fresh = {
        "args": vars(args),
        "started": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine(),
        "png_mib_per_case": data["png_mib_per_case"],
        "runs": [],
        "cache": {},
        "prepare": [],
    }
    saved = fresh
    if (OUT / "results.json").exists():
        # A run of some stages keeps the other stages' results of the same data and settings.
        old = read_results(OUT)
        same = ("work", "sizes", "side", "val", "test")
        if all(old["args"].get(k) == fresh["args"][k] for k in same):
            saved = old
            saved["args"]["stages"] = ",".join(sorted(set(old["args"].get("stages", "train").split(",")) | set(stages)))
            saved.setdefault("prepare", [])
    OUT.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        write_results(OUT, saved)
        write_report(quiet=True)

    if "train" in stages:
        saved["runs"], saved["cache"], saved["started"] = [], {}, fresh["started"]
        plan = [("patch", n, "first") for n in sizes] + [("patch", n, "second") for n in sizes]
        plan += [("resize", n, "cache hit") for n in sizes]
        for mode, n, which in plan:
            cache = work / "cache" / f"n{n}"
            if mode == "patch" and which == "first":
                shutil.rmtree(cache, ignore_errors=True)  # a decoding run starts from an empty cache
            output = work / "runs" / f"{mode}-n{n}-{which.replace(' ', '-')}"
            shutil.rmtree(output, ignore_errors=True)
            output.mkdir(parents=True)
            cmd = train_command(mode, work / "data" / f"n{n}", data["splits"][n], cache, output)
            print(f"== {mode} mode, {n} images, {which} run", flush=True)
            result = measure(cmd, output / "train.log")
            result.update(
                {
                    "mode": mode,
                    "images": n,
                    "run": which,
                    "train": n - args.val - args.test,
                    "val": args.val,
                    "test": args.test,
                }
            )
            saved["runs"].append(result)
            if str(n) not in saved["cache"]:
                saved["cache"][str(n)] = disk_usage(cache)
            # Checkpoints, model files and the MLflow store take ~0.5 GiB per run: keep the log only.
            for path in output.iterdir():
                if path.name != "train.log":
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
            print(
                f"   peak RSS {result['peak_rss_mib']:.0f} MiB, wall {result['wall_s']:.1f} s",
                flush=True,
            )
            save()
    if "prepare" in stages:
        saved["prepare"] = []
        for n in sizes:
            root, split = work / "data" / f"n{n}", data["splits"][n]
            scratch = work / "prepare" / f"n{n}"
            shutil.rmtree(scratch, ignore_errors=True)
            # Decoding into an empty cache, then the same again (cache hit), then the cache hit
            # under tracemalloc (what prepare's result holds; tracemalloc slows Python down, so
            # its run is not timed). Resize mode reads the same cache.
            steps = [
                ("patch", "decode", False),
                ("patch", "cache hit", False),
                ("patch", "cache hit", True),
                ("resize", "cache hit", False),
                ("resize", "cache hit", True),
            ]
            for mode, which, trace in steps:
                result = prepare_only(mode, root, split, scratch / "cache", scratch / "out", trace)
                result.update({"mode": mode, "images": n, "run": which, "traced": trace})
                saved["prepare"].append(result)
                print(
                    f"== prepare {mode} {n} images {which}{' (tracemalloc)' if trace else ''}: "
                    f"{result['seconds']:.1f} s, held {result['traced_held_mib']:.1f} MiB",
                    flush=True,
                )
                save()
            shutil.rmtree(scratch, ignore_errors=True)
    if args.cleanup:
        shutil.rmtree(work / "cache", ignore_errors=True)
        shutil.rmtree(work / "runs", ignore_errors=True)
    write_report()


# ---------------------------------------------------------------------------------- reporting


def write_report(quiet: bool = False) -> None:
    """RESULTS.md from results.json (``--report-only`` rewrites it without running anything)."""
    saved = read_results(OUT)
    args, info, runs = saved["args"], saved["machine"], saved["runs"]
    side = args["side"]
    rows = []
    for r in runs:
        phase = {k: f"{v['max_rss_mib']:.0f}" for k, v in r["phases"].items()}
        rows.append(
            f"| {r['mode']} | {r['images']} ({r['train']} train) | {r['run']} | {r['peak_rss_mib']:.0f} | "
            f"{r['sampled_max_anon_mib']:.0f} | {r['sampled_max_file_mib']:.0f} | {phase.get('prepare', '-')} | "
            f"{phase.get('train', '-')} | {phase.get('predict', '-')} | {r['wall_s']:.1f} | "
            f"{r['phases'].get('prepare', {}).get('seconds', float('nan')):.1f} |"
        )
    ratios = []
    by_key = {(r["mode"], r["images"], r["run"]): r for r in runs}
    sizes = sorted({r["images"] for r in runs})
    if len(sizes) >= 2:
        small, large = sizes[0], sizes[-1]
        for mode, which in (("patch", "first"), ("patch", "second"), ("resize", "cache hit")):
            a, b = by_key.get((mode, small, which)), by_key.get((mode, large, which))
            if a and b:
                ratios.append(
                    f"| {mode} | {which} | {a['peak_rss_mib']:.0f} | {b['peak_rss_mib']:.0f} | "
                    f"{b['peak_rss_mib'] / a['peak_rss_mib']:.3f} | {b['peak_rss_mib'] - a['peak_rss_mib']:+.0f} |"
                )
    cache_rows = [
        f"| {n} | {c['files']} | {c['apparent_mib']:.0f} | {c['allocated_mib']:.0f} | "
        f"{c['apparent_mib'] / int(n):.2f} |"
        for n, c in saved["cache"].items()
    ]
    first = runs[0] if runs else {}
    prepare_rows = []
    for mode in ("patch", "resize"):
        for n in sorted({r["images"] for r in saved.get("prepare", [])}):
            got = {(r["run"], r["traced"]): r for r in saved["prepare"] if r["mode"] == mode and r["images"] == n}
            decode, hit, traced = (
                got.get(("decode", False)),
                got.get(("cache hit", False)),
                got.get(("cache hit", True)),
            )
            if not hit or not traced:
                continue
            decode_s = f"{decode['seconds']:.1f}" if decode else "-"
            decode_peak = f"{decode['peak_rss_mib'] - decode['rss_before_mib']:.0f}" if decode else "-"
            prepare_rows.append(
                f"| {mode} | {n} | {decode_s} | {hit['seconds']:.1f} | "
                f"{traced['traced_held_mib']:.2f} | {1024 * traced['traced_held_mib'] / n:.1f} | "
                f"{traced['traced_peak_mib']:.1f} | {hit['rss_after_mib'] - hit['rss_before_mib']:.0f} | "
                f"{decode_peak} | {hit['peak_rss_mib'] - hit['rss_before_mib']:.0f} |"
            )
    prepare_text = ""
    if prepare_rows:
        prepare_text = (
            "\nData preparation alone (`segx.workflows.prepare.prepare(cfg.data, ...)` in a fresh process, "
            "no TensorFlow; the same folders and split files, a fresh decoded cache). Decode: into the "
            "empty cache; cache hit: the same call again (every file is still hashed, every entry's "
            "headers read). Held: what Python and numpy allocations prepare's result keeps, measured "
            "with `tracemalloc` in a separate cache-hit run (its peak during the call beside it); RSS "
            "growth: VmRSS after the call minus before it, in the timed cache-hit run; peak over start: "
            "the process's VmHWM after the call minus its VmRSS before it (an upper bound on what the "
            "call needed at once; the imports' own peak is in it too), in the decoding and the "
            "cache-hit run.\n\n"
            "| mode | images | decode s | cache hit s | held MiB | held KiB per case | traced peak MiB | "
            "RSS growth MiB | peak over start, decode MiB | peak over start, cache hit MiB |\n"
            "|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(prepare_rows) + "\n"
        )
    text = (
        "# Training memory against dataset size (patch mode and resize mode)\n\n"
        f"`python experiments/memory_flat.py --work {args['work']} --sizes {args['sizes']} --side {side} "
        f"--val {args['val']} --test {args['test']}` ({saved['started']}). Machine: {info.get('cpu')}, "
        f"{info.get('cores')} cores, tensorflow {info.get('tensorflow', '?')}, shared with other jobs.\n\n"
        f"Data: generated {side}x{side} RGB PNGs with binary masks (flat-coloured blobs, "
        f"{saved['png_mib_per_case']:.3f} MiB per image + mask on disk); the smaller folder holds hard "
        "links to the first cases of the larger one. Held fixed: the validation and test cases "
        f"(the same {args['val']} + {args['test']} cases in every run, through `data.split_file`), so the "
        "whole-image validation/test prediction at the end of training does the same work in every run "
        "and only the training set grows.\n\n"
        "Each run: `python -m segx.train data=folder data.root=<folder> backbone=resnet18 trainer.epochs=1 "
        "data.split_file=<split> data.cache_dir=<cache> paths.output_dir=<fresh folder>` plus "
        "`data.mode=patch data.patch_size=64 data.samples_per_epoch=32` (patch; windows of 64 px with "
        "overlap 0.5 at prediction) or `data.mode=resize data.image_size=64` (resize: one pass over "
        f"every training image), in its own process (first command: `{first.get('command', '')}`). "
        "'first': empty decoded cache (every case decoded); 'second' and 'cache hit': a fresh output "
        "folder and MLflow store, same cache (resize mode reads the cache the patch runs wrote).\n\n"
        "Peak RSS: the child's `ru_maxrss` (`os.wait4`), anonymous and file-backed pages together "
        "(Linux starts it at the parent's RSS when the child forks: this driver holds ~190 MiB, far "
        "below every child's peak, and the sampled VmRSS maxima in the phase columns agree with it). "
        "Anon / file: the largest RssAnon and RssFile seen in `/proc/<pid>/status`, sampled every 0.1 s "
        "(file: pages of memory-mapped files, i.e. the decoded cache and shared libraries). Phase "
        "columns: the largest sampled VmRSS while preparing data (reading/decoding the folder, until "
        "the run is created), training (until Keras' end-of-epoch line), and predicting the "
        "validation and test cases whole plus logging (to the end). MiB throughout.\n\n"
        "| mode | images | run | peak RSS | anon | file | prepare | train | predict | wall s | "
        "prepare s |\n|---|---|---|---|---|---|---|---|---|---|---|\n"
        + "\n".join(rows)
        + "\n\nPeak RSS, larger folder against smaller:\n\n"
        f"| mode | run | {sizes[0] if sizes else ''} images | {sizes[-1] if sizes else ''} images | ratio | "
        "difference MiB |\n|---|---|---|---|---|---|\n"
        + "\n".join(ratios)
        + "\n\nDecoded cache on disk (`data.cache_dir`, after the runs):\n\n"
        "| images | files | apparent MiB | allocated MiB | MiB per case |\n|---|---|---|---|---|\n"
        + "\n".join(cache_rows)
        + "\n"
        + prepare_text
    )
    notes = OUT / "NOTES.md"
    if notes.exists():  # findings written by hand after reading the numbers
        text += "\n" + notes.read_text()
    write_results(OUT, report=text)
    if not quiet:
        print(text)


if __name__ == "__main__":
    main()
