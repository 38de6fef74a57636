"""Where long work is: a bar on a terminal, one line per stage in a log; figures pick the worst
and typical cases."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import subprocess
import sys
import termios

import numpy as np

from segx.evaluation.plots import pick_cases

SCRIPT = "from segx.progress import progress\nfor _ in progress(range(3), 'caching test probabilities'): pass\n"


def _run(stderr_tty: bool) -> tuple[str, str]:
    if not stderr_tty:
        result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        return result.stdout, result.stderr
    master, slave = pty.openpty()
    # A terminal 100 columns wide (a new pseudo-terminal has 0, and tqdm draws nothing in 0).
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    seen = b""
    while True:  # read the terminal until the process has exited and the terminal is drained
        ready, _, _ = select.select([master], [], [], 5)
        if not ready:
            break
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the other end closed and everything was read
            break
        if not chunk:
            break
        seen += chunk
    out, _ = proc.communicate(timeout=60)
    os.close(master)
    assert proc.returncode == 0
    return out.decode(), seen.decode(errors="replace")


def test_a_log_gets_one_line_per_stage_and_no_bar():
    out, err = _run(stderr_tty=False)
    assert out == "segx: caching test probabilities (3 images)\n"
    assert "\r" not in out + err and "it/s" not in err and "images/s" not in err


def test_a_terminal_gets_a_bar():
    out, err = _run(stderr_tty=True)
    assert "\rsegx: caching test probabilities:" in err and "/3 [" in err  # tqdm's bar, redrawn on the terminal
    assert out == ""  # and no stage line beside it


def test_figures_show_the_worst_cases_and_typical_ones():
    scores = np.array([0.9, 0.1, 0.8, 0.5, 0.7, 0.3, 0.95])
    shown, labels = pick_cases(scores, 4)
    assert shown[:2] == [1, 5] and labels[:2] == ["worst 1", "worst 2"]  # lowest Dice first
    assert shown[2:] == [4, 2] and labels[2:] == ["typical", "typical"]  # nearest the median (0.7), not repeated
    assert pick_cases(scores[:1], 4) == ([0], ["worst 1"])
