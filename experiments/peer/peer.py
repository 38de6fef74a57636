"""segx against its peer, MONAI on CPU torch: training steps and inference, side by side (issue 15).

    bash experiments/peer/setup.sh                      # once: MONAI + CPU torch in .venv-peer
    .venv/bin/python experiments/peer/peer.py [--rounds 7] [--sizes 128,256]
                     [--backbones resnet34,efficientnetb0] [--threads 2]
    .venv/bin/python experiments/peer/peer.py --levers [--cells resnet34@256] ...
    .venv/bin/python experiments/peer/peer.py --report-only

Two worker processes, started once and driven one JSON line at a time (start-up, model building
and graph tracing excluded): ``worker_tf.py`` in the project's venv (segx's own build_model,
compile_model with Dice + BCE and Adam, and predict_probs) and ``worker_torch.py`` in the peer
venv (MONAI FlexibleUNet, DiceCELoss, Adam). For each network (U-Net with the same backbone in
both, at each size) and each round: a training timing (``steps`` steps of batch 8 on tensors in
memory) and an inference timing (``images`` uint8 images in batches of 8 to float32
probabilities), each side in turn, the order alternating from round to round; then the float32
matmul rate of TF, torch and numpy in each venv. A ratio is taken within a round, so load from
other jobs on the machine hits both sides of it alike; the report gives medians with min-max.

``--levers`` runs segx's worker several times over with one lever each (XLA on the inference
function or the training step, TF op determinism off, oneDNN off, thread pools), alternating
with the unchanged segx worker and MONAI, and writes ``levers.json``.

Writes results.json / levers.json (every timing, after each round) and RESULTS.md here.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

from segx.benchmark.helpers import machine, read_results, spread, write_results

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
BATCH = 8
MATMUL_N, MATMUL_REPS = 2048, 10
NAMES = {"resnet34": "ResNet-34", "efficientnetb0": "EfficientNet-B0"}
BOTH = ("train", "infer")
# Lever name -> (options for worker_tf, extra environment, thread pools, tasks it can change)
LEVERS = {
    "segx": ({}, {}, None, BOTH),
    "xla-infer": ({"jit_infer": True}, {}, None, ("infer",)),
    "xla-train": ({"jit_train": True}, {}, None, ("train",)),
    "nondeterministic": ({"deterministic": False}, {}, None, ("train",)),
    "onednn-off": ({}, {"TF_ENABLE_ONEDNN_OPTS": "0"}, None, BOTH),
    "inter-op-1": ({}, {}, {"intra_op": 2, "inter_op": 1}, BOTH),
    "threads-1": ({}, {}, {"intra_op": 1, "inter_op": 1}, BOTH),
}
# MONAI workers: name -> thread pools (None: --threads). One thread each is the comparison that a
# loaded machine cannot skew: no thread of either side waits at a barrier for a descheduled peer.
PEERS = {"monai": None, "monai-threads-1": {"intra_op": 1, "inter_op": 1}}


class Worker:
    """One worker process; ``ask`` sends a request line and waits for its reply line."""

    def __init__(self, name: str, python: Path, script: Path, env: dict, log: Path):
        self.name = name
        self.log = open(log, "w")  # noqa: SIM115  (kept open for the process's life)
        self.proc = subprocess.Popen(
            [str(python), str(script)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=env,
            cwd=ROOT,
        )

    def ask(self, **request) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"peer: worker {self.name} died; see its log {self.log.name}")
        reply = json.loads(line)
        if "error" in reply:
            raise SystemExit(f"peer: worker {self.name}: {reply['error']}")
        return reply

    def close(self) -> None:
        try:
            self.ask(cmd="quit")
        except (SystemExit, BrokenPipeError, ValueError):
            pass
        self.proc.wait(timeout=60)
        self.log.close()


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def segx_tree(ref: str | None, tmp: Path) -> tuple[Path, str]:
    """Where the TF worker imports segx from: the working tree, or ``ref`` exported read-only
    (other work in progress in the tree then cannot change what is measured)."""
    head = git("rev-parse", "--short", "HEAD")
    if ref is None:
        dirty = bool(git("status", "--porcelain", "segx"))
        return ROOT, f"working tree at {head}" + (" (segx/ modified)" if dirty else "")
    archive = subprocess.run(["git", "archive", ref, "segx"], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
    return tmp, f"{ref} = {git('rev-parse', '--short', ref)} (exported with git archive)"


def work(size: int, args) -> tuple[int, int]:
    """Train steps and inference images per timing: about the same seconds at every size."""
    return (args.steps_128 if size <= 128 else args.steps_256), (args.images_128 if size <= 128 else args.images_256)


def run(args) -> None:
    peer_python = Path(args.peer_venv) / "bin" / "python"
    if not peer_python.exists():
        raise SystemExit(f"peer: {peer_python} missing; run `bash experiments/peer/setup.sh` first")
    cells = [(b, s) for b in args.backbones.split(",") for s in map(int, args.sizes.split(","))]
    if args.cells:
        cells = [(c.split("@")[0], int(c.split("@")[1])) for c in args.cells.split(",")]
    threads = {"intra_op": args.threads, "inter_op": args.threads}
    out_path = HERE / ("levers.json" if args.levers else "results.json")
    logs = HERE / "runs"
    logs.mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="peer-segx-"))
    segx_root, segx_source = segx_tree(args.segx_ref, tmp)
    sides = ["segx", "monai"] if not args.levers else [*args.lever_list.split(","), "monai"]
    if args.levers and "threads-1" in sides:
        sides.append("monai-threads-1")
    workers: dict[str, Worker] = {}
    for side in sides:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "MKL_", "TF_"))}
        if side in PEERS:
            env["PEER_THREADS"] = json.dumps(PEERS[side] or threads)
            workers[side] = Worker(side, peer_python, HERE / "worker_torch.py", env, logs / f"{side}.log")
            continue
        options, extra_env, lever_threads, _ = LEVERS[side]
        env.update(extra_env, PEER_THREADS=json.dumps(lever_threads or threads))
        env["PYTHONPATH"] = os.pathsep.join([str(segx_root), *filter(None, [os.environ.get("PYTHONPATH")])])
        workers[side] = Worker(
            side, ROOT / ".venv" / "bin" / "python", HERE / "worker_tf.py", env, logs / f"{side}.log"
        )
    results = {
        "command": "python experiments/peer/peer.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "machine": machine(),
        "segx_source": segx_source,
        "threads": threads,
        "batch": BATCH,
        "matmul": {"n": MATMUL_N, "reps": MATMUL_REPS},
        "sides": {},
        "cells": {},
        "work": {},
        "rounds": [],
        "rounds_planned": args.rounds,
    }
    try:
        for side, worker in workers.items():
            options = LEVERS[side][0] if side in LEVERS else {}
            results["sides"][side] = worker.ask(cmd="options", options=options)
            print(f"peer: {side}: {results['sides'][side]}", flush=True)
        for backbone, size in cells:
            key = f"{backbone}@{size}"
            steps, images = work(size, args)
            results["work"][key] = {"train_steps": steps, "infer_images": images}
            results["cells"][key] = {}
            for side, worker in workers.items():
                reply = worker.ask(cmd="setup", key=key, backbone=backbone, size=size, images=images)
                results["cells"][key][side] = reply
                print(
                    f"peer: {key} {side}: {reply['params']:,} params, {reply['flops'] / 1e9:.3f} GFLOP/image, "
                    f"built {reply['build_s']:.1f} s, warm-up {reply['warmup_s']:.1f} s",
                    flush=True,
                )
        t_start = time.perf_counter()
        for r in range(args.rounds):
            t_round = time.perf_counter()
            shift = r % len(sides)  # each side takes each place in the order once per len(sides) rounds
            order = sides[shift:] + sides[:shift]
            timings: dict = {}
            for key in results["cells"]:
                timings[key] = {"train": {}, "infer": {}}
                for task in ("train", "infer"):
                    for side in order:
                        if task not in LEVERS.get(side, (None, None, None, BOTH))[3]:
                            continue  # a lever that cannot change this task is not timed on it
                        request = {"cmd": task, "key": key, "steps": results["work"][key]["train_steps"]}
                        timings[key][task][side] = workers[side].ask(**request)["seconds"]
            mat = {side: workers[side].ask(cmd="matmul", n=MATMUL_N, reps=MATMUL_REPS) for side in order}
            results["rounds"].append(
                {
                    "round": r,
                    "order": order,
                    "timings": timings,
                    "matmul": mat,
                    "seconds": time.perf_counter() - t_round,
                    "load": os.getloadavg(),
                }
            )
            write_results(out_path.parent, results, name=out_path.name)
            summary = "; ".join(
                f"{key} {task} "
                + "/".join(
                    f"{rate(results, key, task, side, timings):.1f}" if side in timings[key][task] else "-"
                    for side in sides
                )
                for key in timings
                for task in ("train", "infer")
            )
            print(
                f"peer: round {r + 1}/{args.rounds} ({time.perf_counter() - t_round:.0f} s, "
                f"load {os.getloadavg()[0]:.1f}) img/s {'/'.join(sides)}: {summary}",
                flush=True,
            )
            if args.max_minutes and (time.perf_counter() - t_start) / 60 > args.max_minutes:
                print(f"peer: stopping after {r + 1} rounds (--max-minutes {args.max_minutes})", flush=True)
                break
    finally:
        for worker in workers.values():
            worker.close()
        shutil.rmtree(tmp, ignore_errors=True)
    write_report()
    print(f"peer: wrote {out_path} and {HERE / 'RESULTS.md'}", flush=True)


# --- report ---------------------------------------------------------------------------------------


def rate(results: dict, key: str, task: str, side: str, timings: dict) -> float:
    """Images per second of one timing."""
    work = results["work"][key]
    n = work["train_steps"] * BATCH if task == "train" else work["infer_images"]
    return n / timings[key][task][side]


med = partial(spread, empty="-")  # median (min-max); "-" for no values


def peak(results: dict) -> float:
    """The reference matmul rate: the highest of every library's in the run (GFLOP/s). On a shared
    machine a round's own matmul timing is as loaded as the round, so the least loaded one is the
    best estimate of what the cores can do."""
    return max(v for round_ in results["rounds"] for side in round_["matmul"].values() for v in side.values())


def series(results: dict, key: str, task: str, side: str) -> dict:
    """Per-round img/s, achieved GFLOP/s and fraction of the round's matmul rate."""
    flops = results["cells"][key][side]["flops"] * (3 if task == "train" else 1)
    out = {"img_s": [], "gflops": [], "fraction": []}
    for round_ in results["rounds"]:
        img_s = rate(results, key, task, side, round_["timings"])
        out["img_s"].append(img_s)
        out["gflops"].append(img_s * flops / 1e9)
        out["fraction"].append(img_s * flops / 1e9 / peak(results))
    return out


def ratios(results: dict, key: str, task: str, a: str, b: str) -> list[float]:
    return [
        rate(results, key, task, a, r["timings"]) / rate(results, key, task, b, r["timings"]) for r in results["rounds"]
    ]


def header(results: dict) -> list[str]:
    sides = results["sides"]
    tf_side = sides["segx"]
    loads = [r["load"][0] for r in results["rounds"]]
    return [
        f"`{results['command']}` ({results['date']}; {len(results['rounds'])} of {results['rounds_planned']} rounds done, "
        f"{sum(r['seconds'] for r in results['rounds']) / 60:.1f} min of rounds). Machine: {results['machine']['cpu']}, "
        f"{results['machine']['cores']} cores, Python {results['machine']['python']}; tensorflow {tf_side['tensorflow']} "
        f"(segx from the {results['segx_source']}), torch {sides['monai']['torch']} + MONAI {sides['monai']['monai']} "
        f"(CPU build, its own venv). Threads: TF intra-op {tf_side['intra_op']} / inter-op {tf_side['inter_op']}, "
        f"torch {sides['monai']['intra_op']} / interop {sides['monai']['inter_op']}. The machine was shared with other "
        f"agents' jobs (1-minute load average after each round {min(loads):.1f}-{max(loads):.1f} on "
        f"{results['machine']['cores']} cores): absolute figures move with that load; the ratios are taken within a "
        "round, where both sides ran back to back in alternating order, and that alternation is what makes them fair.",
    ]


def network_table(results: dict, sides: list[str]) -> list[str]:
    lines = [
        "| network | px | segx params | MONAI params | segx GFLOP/image | MONAI GFLOP/image | segx/MONAI FLOPs | segx profiler GFLOP |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, cell in results["cells"].items():
        backbone, size = key.split("@")
        s, m = cell[sides[0]], cell["monai"]
        lines.append(
            f"| {NAMES.get(backbone, backbone)} U-Net | {size} | {s['params'] / 1e6:.2f} M | {m['params'] / 1e6:.2f} M | "
            f"{s['flops'] / 1e9:.3f} | {m['flops'] / 1e9:.3f} | {s['flops'] / m['flops']:.2f} | "
            f"{s['flops_segx_profiler'] / 1e9:.3f} |"
        )
    return lines


def speed_table(results: dict) -> list[str]:
    lines = [
        "| network | px | task | segx img/s | MONAI img/s | segx/MONAI img/s | segx GFLOP/s | MONAI GFLOP/s | "
        "segx/MONAI GFLOP/s | segx % of matmul | MONAI % of matmul | segx/MONAI, best round each |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key in results["cells"]:
        backbone, size = key.split("@")
        for task in ("train", "infer"):
            s, m = series(results, key, task, "segx"), series(results, key, task, "monai")
            ratio = ratios(results, key, task, "segx", "monai")
            gratio = [a / b for a, b in zip(s["gflops"], m["gflops"], strict=True)]
            lines.append(
                f"| {NAMES.get(backbone, backbone)} U-Net | {size} | {'training' if task == 'train' else 'inference'} | "
                f"{med(s['img_s'], 1)} | {med(m['img_s'], 1)} | **{med(ratio, 2)}** | {med(s['gflops'], 1)} | "
                f"{med(m['gflops'], 1)} | {med(gratio, 2)} | {med([100 * f for f in s['fraction']], 0)} | "
                f"{med([100 * f for f in m['fraction']], 0)} | {max(s['img_s']) / max(m['img_s']):.2f} |"
            )
    return lines


def matmul_table(results: dict) -> list[str]:
    libs = {}
    for round_ in results["rounds"]:
        for side in round_["matmul"].values():
            for lib, value in side.items():
                libs.setdefault(lib, []).append(value)
    names = {
        "tf": "TensorFlow (segx venv)",
        "numpy_tf_venv": "numpy (segx venv)",
        "torch": "torch (peer venv)",
        "numpy_peer_venv": "numpy (peer venv)",
    }
    lines = [f"| {MATMUL_N}x{MATMUL_N} float32 matmul | GFLOP/s |", "|---|---|"]
    lines += [f"| {names.get(lib, lib)} | {med(values, 1)} |" for lib, values in libs.items()]
    lines.append(f"| highest of the run (the reference for '% of matmul') | {peak(results):.1f} |")
    return lines


def lever_table(lev: dict) -> list[str]:
    levers = [s for s in lev["sides"] if s != "segx" and s not in PEERS]
    lines = [
        "| network | px | task | lever | segx img/s before | after | after/before | segx/MONAI before | after | after % of matmul |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key in lev["cells"]:
        backbone, size = key.split("@")
        for task in ("train", "infer"):
            base = series(lev, key, task, "segx")
            for lever in levers:
                if task not in LEVERS[lever][3]:
                    continue
                after = series(lev, key, task, lever)
                peer = "monai-threads-1" if lever == "threads-1" and "monai-threads-1" in lev["sides"] else "monai"
                lines.append(
                    f"| {NAMES.get(backbone, backbone)} U-Net | {size} | {'training' if task == 'train' else 'inference'} | "
                    f"{lever} | {med(base['img_s'], 1)} | {med(after['img_s'], 1)} | "
                    f"**{med(ratios(lev, key, task, lever, 'segx'), 2)}** | "
                    f"{med(ratios(lev, key, task, 'segx', 'monai'), 2)} | "
                    f"{med(ratios(lev, key, task, lever, peer), 2)}{' (vs MONAI 1 thread)' if peer != 'monai' else ''} | "
                    f"{med([100 * f for f in after['fraction']], 0)} |"
                )
    return lines


def write_report() -> None:
    results_path, levers_path = HERE / "results.json", HERE / "levers.json"
    if not results_path.exists():
        raise SystemExit(f"peer: {results_path} missing; run the benchmark first")
    results = read_results(HERE)
    notes_path = HERE / "notes.md"  # the reading of the numbers, written by hand after a run
    lines = ["# segx against MONAI (CPU torch): training and inference side by side", ""]
    lines += header(results) + [""]
    lines += [
        "- **segx**: `segx.models.build_model('unet', backbone, size)`, BatchNorm momentum 0.9, "
        "`compile_model` with Dice + BCE and Adam 1e-3, TF op determinism on (the trainer defaults); "
        "training = `train_on_batch` on preprocessed float32 tensors in memory; inference = "
        "`segx.models.predict_probs` (uint8 images, batches of 8, plain pass).",
        "- **MONAI**: `FlexibleUNet(3, 1, backbone, pretrained=False, spatial_dims=2)` (decoder "
        "256-128-64-32-16 like segx's), `DiceCELoss(sigmoid=True)`, Adam 1e-3, a plain training loop; "
        "inference in `eval()` under `torch.inference_mode()`, uint8 images normalised in torch, batches of 8.",
        f"- Batch {BATCH}. Per round and network: "
        + ", ".join(
            f"{k}: {w['train_steps']} training steps, {w['infer_images']} images inferred"
            for k, w in results["work"].items()
        )
        + ". Every timing excludes start-up, building and tracing (two warm-up steps and one inference first).",
        "- FLOPs: forward FLOPs per image of the convolutions (2 x multiply-adds), counted alike on both "
        "sides: from the frozen TF graph's shapes for segx and with `torch.utils.flop_counter.FlopCounterMode` "
        "for MONAI; training counts 3 x forward. 'segx profiler' is `segx.models.count_flops` (TF's profiler, "
        "which has no count for depthwise convolutions). '% of matmul' = achieved GFLOP/s over the highest float32 "
        f"{MATMUL_N}x{MATMUL_N} matmul rate measured in the run (TF, torch, numpy in either venv; each measured "
        "once per round, in the same processes).",
        "- Values: median (min-max) over rounds; ratios taken within each round.",
        "",
    ]
    if notes_path.exists():
        lines += [notes_path.read_text().strip(), ""]
    lines += ["## Speed", ""] + speed_table(results) + [""]
    lines += ["## Networks", ""] + network_table(results, ["segx"]) + [""]
    lines += ["## Matmul rate (same run)", ""] + matmul_table(results) + [""]
    if levers_path.exists():
        lev = read_results(HERE, "levers.json")
        lines += ["## Levers on segx's side", ""] + header(lev) + [""]
        lines += [
            f"Each lever is a separate segx worker ({', '.join(s for s in lev['sides'] if s != 'segx' and s not in PEERS)}) "
            "alternating with the unchanged segx worker and MONAI in the same rounds; 'after/before' is the lever's img/s "
            "over unchanged segx's in the same round.",
            "",
        ]
        lines += lever_table(lev) + [""]
    write_results(HERE, report="\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--sizes", default="128,256")
    parser.add_argument("--backbones", default="resnet34,efficientnetb0")
    parser.add_argument("--cells", default="", help="backbone@size,... instead of backbones x sizes")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="intra- and inter-op threads, both sides")
    parser.add_argument("--steps-128", type=int, default=4)
    parser.add_argument("--steps-256", type=int, default=2)
    parser.add_argument("--images-128", type=int, default=32)
    parser.add_argument("--images-256", type=int, default=16)
    parser.add_argument("--peer-venv", default=str(ROOT / ".venv-peer"))
    parser.add_argument(
        "--segx-ref", default=None, help="measure segx/ as committed at this git ref, not the working tree"
    )
    parser.add_argument("--levers", action="store_true", help="segx workers with one lever each -> levers.json")
    parser.add_argument("--lever-list", default=",".join(LEVERS))
    parser.add_argument("--max-minutes", type=float, default=0, help="stop after the round that passes this")
    parser.add_argument("--report-only", action="store_true", help="rewrite RESULTS.md from the JSON files")
    args = parser.parse_args()
    if args.report_only:
        write_report()
        print(f"peer: wrote {HERE / 'RESULTS.md'}")
        return
    unknown = [lever for lever in args.lever_list.split(",") if lever not in LEVERS]
    if unknown:
        raise SystemExit(f"peer: unknown lever {unknown[0]}; levers are {', '.join(LEVERS)}")
    run(args)


if __name__ == "__main__":
    main()
