"""segx: config-driven experiments for 2D medical image segmentation ensembles."""

import sys

__version__ = "0.2.0"

if sys.argv[:1] == ["-m"]:
    # `python -m segx.<command>` (Python sets argv[0] to "-m" while it locates the module):
    # Ctrl-C/SIGTERM give one line and exit 128 + signal from the first import on, not only
    # once the command's main() runs. Importing segx as a library leaves signals alone.
    from segx import signals

    signals.install()
