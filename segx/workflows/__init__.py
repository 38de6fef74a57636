"""The only code that reads a composed config (``DictConfig``) and talks to MLflow runs: train a
member, build an ensemble, predict or export from a run. Commands (``segx/<command>.py``) parse
the command line and call these; the benchmark calls them too. The stage packages below
(``data``, ``training``, ``ensembling``, ``inference``, ``scoring``) take plain arguments and
import neither ``tracking`` nor Hydra (contracts in pyproject.toml, checked by ``make test``)."""
