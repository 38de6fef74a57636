"""``python -m segx.data.check``: the data check's first address (the README's and users'
scripts). The command is :mod:`segx.check` (``segx-check``, ``python -m segx.check``); this runs
that module as the program, the way ``python -m`` would, so no stage package imports a command."""

if __name__ == "__main__":
    import runpy

    runpy.run_module("segx.check", run_name="__main__", alter_sys=True)
