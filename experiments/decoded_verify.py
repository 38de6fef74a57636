"""What verifying the decoded cache costs (issue 21): each entry's arrays are hashed again the
first time a process uses the entry, and not again in that process.

    python experiments/decoded_verify.py [--sizes 256,1024,2048] [--cases 8] [--rounds 5]

For each image size: ``--cases`` PNG pairs are decoded once into a fresh cache; then, in
``--rounds`` alternating rounds, the entries are opened as a new process would (the set of
verified entries emptied: the full check) and as the same process would (already verified). The
table gives the median time per entry with the range over rounds, and the megabytes per second of
the full check. Writes experiments/decoded_verify/results.json and RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from segx.benchmark.helpers import write_results

OUT = Path(__file__).resolve().parent / "decoded_verify"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="256,1024,2048")
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    from segx.data import decoded
    from segx.data.folder import Case

    rows, raw = [], {}
    with tempfile.TemporaryDirectory(prefix="segx-verify-") as tmp:
        tmp = Path(tmp)
        for size in map(int, args.sizes.split(",")):
            rng = np.random.default_rng(size)
            cases = []
            for i in range(args.cases):
                image = tmp / f"s{size}" / f"c{i}.png"
                mask = tmp / f"s{size}" / f"m{i}.png"
                image.parent.mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(image), rng.integers(0, 256, (size, size, 3), np.uint8))
                cv2.imwrite(str(mask), ((rng.random((size, size)) > 0.7) * 255).astype(np.uint8))
                cases.append(Case(f"c{i}", image, mask))
            root = tmp / f"cache{size}"
            decoded.decode_cases(cases, root)  # written once (and verified by this process)
            megabytes = sum(p.stat().st_size for p in root.rglob("*.npy")) / args.cases / 1e6
            full, again = [], []
            for _ in range(args.rounds):  # alternating: the machine's drift hits both alike
                decoded._VERIFIED.clear()  # a new process: nothing verified yet
                t0 = time.perf_counter()
                decoded.decode_cases(cases, root)
                full.append((time.perf_counter() - t0) / args.cases)
                t0 = time.perf_counter()
                decoded.decode_cases(cases, root)
                again.append((time.perf_counter() - t0) / args.cases)
            raw[size] = {"full_s": full, "again_s": again, "mb_per_entry": megabytes}
            med, base = statistics.median(full), statistics.median(again)
            rows.append((size, megabytes, med, min(full), max(full), base, med - base, megabytes / (med - base)))
    OUT.mkdir(exist_ok=True)
    write_results(OUT, {"cases": args.cases, "rounds": args.rounds, "sizes": raw}, indent=2)
    lines = [
        "# Verifying the decoded cache",
        "",
        f"`python experiments/decoded_verify.py` ({args.cases} cases per size, {args.rounds} alternating rounds; "
        "time per entry, median [min, max]; opening an entry includes reading its meta.json).",
        "",
        "Both columns include what opening an entry always cost (hashing the source PNGs for the entry's key); "
        "the check adds the difference.",
        "",
        "| image | arrays per entry | first use in a process | already verified | added by the check | check rate |",
        "|---|---|---|---|---|---|",
    ]
    for size, mb, med, low, high, again, added, rate in rows:
        lines.append(
            f"| {size}x{size} | {mb:.2f} MB | {med * 1e3:.2f} ms [{low * 1e3:.2f}, {high * 1e3:.2f}] | "
            f"{again * 1e3:.2f} ms | {added * 1e3:.2f} ms | {rate:.0f} MB/s |"
        )
    text = "\n".join(lines) + "\n"
    write_results(OUT, report=text)
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
