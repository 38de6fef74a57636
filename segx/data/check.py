"""``python -m segx.data.check``: the data check's first address (the README's and users'
scripts). The command is :mod:`segx.check` (``segx-check``); this runs it."""

if __name__ == "__main__":
    from segx.check import (
        main,  # the one import of a command from a stage package (pyproject's contracts allow it)
    )

    main()
