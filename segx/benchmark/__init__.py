"""The DSB2018 study behind `python -m segx.bench`: its stages and its report."""
