"""The whole volume benchmark in order (issue 29): memory, flow, speed (with flow's ensemble),
2D against 2.5D, the MR demo; each script writes its section of results.json and rewrites
RESULTS.md; the seconds each took go into the ``run_all`` section.

    python experiments/volumes/run_all.py [--work /tmp/segx-volbench] [--quick] [--only memory,flow,...]

``--quick`` (the smaller sizes, for a budget of about 25 minutes on 2 shared CPU cores): memory in resize mode only, the
flow's members trained 3 epochs instead of 15, 2D/2.5D members 4 epochs. Without it: both memory
modes, the flow as configured (15 epochs), 6 epochs for 2D/2.5D.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from common import save

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=str, default="/tmp/segx-volbench")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", default="memory,flow,speed,context,mr_demo,stacked_postprocess")
    args = parser.parse_args()
    quick = {
        "memory": ["--quick"],
        "flow": ["--quick"],
        "speed": [],
        "context": ["--epochs", "4"],
        "mr_demo": [],
        "stacked_postprocess": [],
    }
    started = time.perf_counter()
    seconds = {}
    for name in args.only.split(","):
        extra = quick[name] if args.quick else []
        work = [] if name == "stacked_postprocess" else ["--work", args.work]
        cmd = [sys.executable, str(HERE / f"{name}.py"), *work, *extra]
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        seconds[name] = time.perf_counter() - t0
        print(f"== {name}: {seconds[name]:.0f} s", flush=True)
    total = time.perf_counter() - started
    save("run_all", {"quick": args.quick, "parts_s": seconds, "total_s": total, "command": " ".join(sys.argv[1:])})
    print(f"== all: {total / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
