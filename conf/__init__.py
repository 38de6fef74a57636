"""segx's Hydra configs, installed with the package as ``segx.conf`` (Hydra: ``pkg://segx.conf``).

Each folder is a config group and each file name the word typed on the command line
(``backbone=resnet34`` is ``backbone/resnet34.yaml``). No code lives here.
"""
