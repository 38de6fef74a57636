"""Config helpers shared by the entry points: composing configs, choice lists, group look-up with
suggestions, and range/type checks that name the key. (Objects built from ``_target_`` are
checked and built in :mod:`segx.objects`.) No TensorFlow here."""

from __future__ import annotations

import importlib.resources
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from segx.errors import SegxError, suggest
from segx.tta import TTA_MODES  # noqa: F401 - re-exported: commands check ensemble.tta against it

# The repository's conf/ is installed as the package segx.conf (pyproject.toml): every command
# names it as Hydra's pkg:// path, so console scripts, `python -m` and a non-editable install
# find it from any folder; CONF_DIR is the same folder on disk, for segx's own pre-checks.
CONF_PATH = "pkg://segx.conf"
CONF_DIR = Path(str(importlib.resources.files("segx.conf")))

# Choice lists that several modules check or offer, in one place (no heavy imports here).
ARCHS = ("unet", "fpn", "linknet", "pspnet")  # segmentation-models decoders; conf/arch/<name>.yaml
SEARCH_METHODS = ("grid", "greedy", "optimize")  # ensemble.search


def _dirs(conf_dir) -> list[Path]:
    """One config folder or several (segx's conf/ first, then the user's, as Hydra searches)."""
    return [Path(d) for d in conf_dir] if isinstance(conf_dir, (list, tuple)) else [Path(conf_dir)]


def group_options(group: str, conf_dir: Path | Sequence[Path] = CONF_DIR) -> list[str]:
    return sorted({p.stem for d in _dirs(conf_dir) for p in (d / group).glob("*.yaml")})


def search_dirs(argv: Sequence[str]) -> list[Path]:
    """The config folders Hydra will search besides conf/: ``--config-dir``/``-cd`` and
    ``hydra.searchpath=[file://...]`` entries (``pkg://`` ones cannot be listed here)."""
    extra = []
    for i, arg in enumerate(argv):
        if arg in ("--config-dir", "-cd") and i + 1 < len(argv):
            extra.append(argv[i + 1])
        elif arg.startswith("--config-dir="):
            extra.append(arg.split("=", 1)[1])
        elif arg.startswith(("hydra.searchpath=", "+hydra.searchpath=", "++hydra.searchpath=")):
            for item in arg.split("=", 1)[1].strip("[]").split(","):
                item = item.strip().strip("'\"")
                if item.startswith("file://"):
                    extra.append(item[len("file://") :])
                elif item and "://" not in item:
                    extra.append(item)
    return [Path(d).expanduser().resolve() for d in extra]


def check_group_choices(argv: Sequence[str], conf_dir: Path | Sequence[Path] = CONF_DIR) -> None:
    """Fail fast, in one line with a suggestion, on ``group=value`` naming no config file.

    Hydra's own message lists every option over many lines; this runs before Hydra, over the
    same config folders Hydra will search (``conf_dir``: conf/ and the user's).
    """
    groups = {p.name for d in _dirs(conf_dir) if d.is_dir() for p in d.iterdir() if p.is_dir()}
    for arg in argv:
        if "=" not in arg or arg.startswith(("-", "~", "hydra")):
            continue
        key, value = arg.lstrip("+").split("=", 1)
        if key not in groups or value in ("", "null"):
            continue
        values = value.split(",") if not value.startswith(("range(", "choice(", "glob(")) else []
        options = group_options(key, conf_dir)
        for v in values:
            v = v.strip()
            if v not in options:
                hint = suggest(v, options) or f" choose one of {', '.join(options)}"
                where = " or ".join(f"{d}/{key}/" if d != CONF_DIR else f"conf/{key}/" for d in _dirs(conf_dir))
                raise SegxError(f"unknown {key} '{v}';{hint} (see {where})")


MAX_CONFIG_NODES = 100_000  # values a config file may expand to (segx's largest: a few hundred)
MAX_CONFIG_DEPTH = 64
MAX_CONFIG_BYTES = 1 << 20


def check_config_files(conf_dir: Path | Sequence[Path] = CONF_DIR) -> None:
    """Every YAML file Hydra may compose from ``conf_dir`` (segx's and the user's folders), bounded
    before it is composed: a YAML alias bomb (``&a [*b, *b, ...]`` nested) is a few lines that
    expand to billions of values and once took 5.2 GB and 10 minutes. Counted on YAML's node
    graph, where an alias is the node it names, so the check itself stays small."""
    import yaml

    for folder in _dirs(conf_dir):
        for path in sorted(folder.rglob("*.yaml")) if folder.is_dir() else []:
            size = path.stat().st_size
            if size > MAX_CONFIG_BYTES:
                raise SegxError(
                    f"{path}: {size} bytes is over the {MAX_CONFIG_BYTES} a config file may hold; "
                    "keep data out of configs (point at a file instead)"
                )
            try:
                node = yaml.compose(path.read_text(errors="replace"), Loader=yaml.SafeLoader)
            except yaml.YAMLError as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise SegxError(f"{path}: not valid YAML ({first}); fix the file") from None
            if node is not None and (count := _expanded_size(node, path, {})) > MAX_CONFIG_NODES:
                raise SegxError(
                    f"{path}: its aliases expand to {count} values, over the {MAX_CONFIG_NODES} a config may "
                    "hold (a YAML alias bomb?); remove the repeated aliases"
                )


def _expanded_size(node, path: Path, memo: dict[int, int], depth: int = 0) -> int:
    """How many values a YAML node stands for once its aliases are expanded (``memo``: per node)."""
    import yaml

    if depth > MAX_CONFIG_DEPTH:
        raise SegxError(f"{path}: nested more than {MAX_CONFIG_DEPTH} levels deep; flatten it")
    if id(node) not in memo:
        if isinstance(node, yaml.MappingNode):
            for key, _ in node.value:
                _check_key_node(key, path)
            children = [c for pair in node.value for c in pair]
        else:
            children = node.value if isinstance(node, yaml.SequenceNode) else []
        memo[id(node)] = 1 + sum(_expanded_size(c, path, memo, depth + 1) for c in children)
    return memo[id(node)]


_YAML_BOOL, _YAML_NULL = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:null"


def _check_key_node(key, path: Path) -> None:
    """A YAML key that is not a name: ``null:`` (which OmegaConf cannot hold: Hydra stops in many
    lines) or an unquoted yes, no, on, off (YAML 1.1 booleans: two become one key)."""
    import yaml

    if isinstance(key, yaml.ScalarNode) and key.tag in (_YAML_BOOL, _YAML_NULL):
        kind = "null" if key.tag == _YAML_NULL else "a boolean"
        raise SegxError(
            f"{path}:{key.start_mark.line + 1}: the key {key.value or '(empty)'!s} is read as {kind}, not a name; "
            f"quote it ('{key.value or 'name'}':) or rename it"
        )


# Dicts that name classes: on the command line each replaces, never merges into, a config's own
# (Hydra merges a dict override into the dict it overrides, keeping the config's other keys).
CLASS_DICTS = ("data.labels", "data.palette", "data.regions")


def check_override_values(config_name: str, argv: Sequence[str], conf_dir: Path | Sequence[Path] = CONF_DIR) -> None:
    """Fail fast, in one line, on an override Hydra cannot read (a quoted or non-ASCII class name,
    a ``null`` key) and on a class dict that Hydra would merge into the config's own: a command-line
    ``data.labels`` with other classes than the YAML's would keep the YAML's extra classes."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    given = {}
    for arg in argv:
        if "=" not in arg or arg.startswith("-"):
            continue
        key, value = arg.split("=", 1)
        name = key.lstrip("+~")
        try:
            override = parser.parse_override(arg)
        except Exception as exc:  # noqa: BLE001 - Hydra's parse errors have several types
            if name in CLASS_DICTS:
                _check_dict_names(name, value)
            first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
            raise SegxError(
                f"cannot read the override {arg!r} ({first}); see Hydra's override grammar "
                "(https://hydra.cc/docs/advanced/override_grammar/basic/)"
            ) from None
        if override.is_sweep_override():
            continue
        found = _null_key(override.value())
        if found is not None:
            raise SegxError(
                f"{name}: a key{' under ' + found.rstrip('.') if found else ''} is null, which names nothing; "
                "name it (class names: a letter, then letters, digits, '_' or '-')"
            )
        if name in CLASS_DICTS and not key.startswith(("+", "~")) and isinstance(override.value(), dict):
            given[arg] = (name, override.value())
    if given:
        _check_dict_replacements(config_name, argv, given, conf_dir)


def _null_key(value, where: str = "") -> str | None:
    if isinstance(value, dict):
        for k, v in value.items():
            if k is None:
                return where
            found = _null_key(v, f"{where}{k}.")
            if found is not None:
                return found
    elif isinstance(value, list):
        for v in value:
            found = _null_key(v, where)
            if found is not None:
                return found
    return None


def _check_dict_names(key: str, value: str) -> None:
    """The class names of a dict Hydra's grammar cannot read (``"left lung"``, ``a:b``, ``é``), read
    as YAML to name the one at fault; nothing when YAML cannot read it either."""
    import yaml

    try:
        names = yaml.safe_load(value)
    except yaml.YAMLError:
        return
    if not isinstance(names, dict):
        return
    for name in names:
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_\-]*", name):
            plain = re.sub(r"[^A-Za-z0-9_-]+", "_", str(name)).strip("_")
            raise SegxError(
                f"{key}: the name {name!r} must start with a letter and hold only letters, digits, '_' and '-' "
                f"(it becomes a metric name); rename it{', e.g. ' + plain if plain[:1].isalpha() else ''}"
            )


def _check_dict_replacements(config_name: str, argv: Sequence[str], given: dict, conf_dir) -> None:
    """A command-line class dict over a config's own dict with other keys: Hydra would merge the two
    (keeping the config's extra classes) or stop in many lines (a new key): refuse in one line."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return
    dirs = _dirs(conf_dir)
    overrides = [a for a in argv if "=" in a and not a.startswith(("-", "hydra.")) and a not in given]
    if len(dirs) > 1:
        overrides.append("hydra.searchpath=[" + ",".join(f"file://{d}" for d in dirs[1:]) + "]")
    try:
        with initialize_config_dir(str(dirs[0]), version_base="1.3"):
            cfg = compose(config_name, overrides=overrides)
    except Exception:  # noqa: BLE001 - leave the full diagnosis to Hydra itself
        return
    finally:
        GlobalHydra.instance().clear()
    for key, value in given.values():
        own = OmegaConf.select(cfg, key)
        if not isinstance(own, DictConfig):
            continue
        extra = [str(k) for k in own if k not in value]
        new = [str(k) for k in value if k not in own]
        if extra or new:
            held = f"{key} of the config ({', '.join(map(str, own))})"
            what = (
                f"lacks {', '.join(extra)} of {held}, which Hydra would keep (it merges dicts)"
                if extra
                else f"adds {', '.join(new)} to {held}, which Hydra cannot merge"
            )
            raise SegxError(
                f"{key} on the command line {what}; to replace it, clear it first: {key}=null '{key}={{...}}'"
            )


def check_override_keys(config_name: str, argv: Sequence[str], conf_dir: Path | Sequence[Path] = CONF_DIR) -> None:
    """Fail fast, in one line with a suggestion, on ``a.b=value`` naming no config key.

    Composes the config with the group choices given on the command line (Hydra's own error
    for an unknown key spans several lines and hides the closest valid name).
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    dirs = _dirs(conf_dir)
    groups = {p.name for d in dirs if d.is_dir() for p in d.iterdir() if p.is_dir()}
    choices, keys = [], []
    for arg in argv:
        if "=" not in arg or arg.startswith(("-", "~", "+", "hydra")):
            continue
        key, value = arg.split("=", 1)
        if key in groups:
            if "," not in value:
                choices.append(arg)
        elif "." in key or key.isidentifier():
            keys.append(key)
    if not keys and not choices:
        return
    if GlobalHydra.instance().is_initialized():
        return  # inside a running Hydra app: Hydra has already composed the config
    if len(dirs) > 1:
        choices.append("hydra.searchpath=[" + ",".join(f"file://{d}" for d in dirs[1:]) + "]")
    try:
        with initialize_config_dir(str(dirs[0]), version_base="1.3"):
            cfg = compose(config_name, overrides=choices)
    except Exception as exc:  # noqa: BLE001 - leave the full diagnosis to Hydra itself, but for:
        # a group this command does not use (segx.predict backbone=resnet18, which completion offers)
        unused = re.match(r"Could not override '([^']+)'\. No match in the defaults list", str(exc))
        if unused:
            arg = next(a for a in choices if a.split("=", 1)[0] == unused.group(1))
            raise SegxError(
                f"{arg}: conf/{config_name}.yaml has no {unused.group(1)} group (this command does not choose "
                f"one); drop {arg}"
            ) from None
        return
    finally:
        GlobalHydra.instance().clear()
    for key in keys:
        parent_key, _, leaf = key.rpartition(".")
        parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
        if isinstance(parent, DictConfig) and (leaf in parent.keys() or parent_key.endswith("options")):
            continue
        if not isinstance(parent, DictConfig):
            raise SegxError(f"unknown config key '{key}': '{parent_key}' is not a section; check the spelling")
        hint = suggest(leaf, list(parent.keys()))
        hint = f" did you mean '{(parent_key + '.') if parent_key else ''}{hint.split(chr(39))[1]}'?" if hint else ""
        raise SegxError(
            f"unknown config key '{key}';{hint or ' see conf/ for the keys'} (add a new key with +{key}=...)"
        )


def compose(config_name: str, overrides: Sequence[str]) -> DictConfig:
    """Compose a segx config from Python: inside a running Hydra app (reusing its search
    path) or outside one (tests, notebooks)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return hydra_compose(config_name, overrides=list(overrides))
    with initialize_config_module("segx.conf", version_base="1.3"):
        return hydra_compose(config_name, overrides=list(overrides))


def compose_with_hydra(config_name: str, overrides: Sequence[str], conf_dirs: Sequence[Path]) -> DictConfig:
    """The config with its ``hydra`` node (launcher, sweeper, runtime choices), as a command
    would compose it from ``conf_dirs`` (segx's conf/ first); outside a running Hydra app."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    overrides = list(overrides)
    if len(conf_dirs) > 1:
        overrides.append("hydra.searchpath=[" + ",".join(f"file://{d}" for d in conf_dirs[1:]) + "]")
    try:
        with initialize_config_dir(str(conf_dirs[0]), version_base="1.3"):
            return hydra_compose(config_name, overrides=overrides, return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()


_FROM_ENVIRONMENT = ("${oc.env:", "${env:")
_KEY = re.compile(r"[A-Za-z0-9_.\- /]+")  # what MLflow takes as a param name, segx's keys all


def check_key_names(cfg: DictConfig, skip: Sequence[str] = ("hydra",)) -> None:
    """Every config key a plain name (keys become MLflow param names): an interpolation as a key
    (``"${oc.env:HOME}": 1``) or punctuation is one line naming it, before a run exists."""

    def walk(node, where: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                text = str(key)
                if not _KEY.fullmatch(text):
                    place = f" (under {where})" if where else ""
                    raise SegxError(
                        f"config key {text!r}{place} is not a plain name (letters, digits, _ - . / and "
                        "spaces): rename it; an interpolation cannot be a key"
                    )
                if not where and text in skip:
                    continue
                walk(value, f"{where}.{text}" if where else text)
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{where}[{i}]")

    walk(OmegaConf.to_container(cfg, resolve=False), "")


def recorded_container(cfg: DictConfig) -> dict:
    """The resolved config as segx records it (MLflow params, ``config.yaml``), except that a
    value taken from the environment (``${oc.env:TOKEN}``: tokens, passwords, private paths) is
    recorded as written, not as its value: what the run used stays reproducible from the same
    environment, and no secret lands in the tracking store."""
    raw = OmegaConf.to_container(cfg, resolve=False)
    resolved = OmegaConf.to_container(cfg, resolve=True)

    def merge(raw_node, node):
        if isinstance(raw_node, str) and any(m in raw_node for m in _FROM_ENVIRONMENT):
            return raw_node
        if isinstance(raw_node, dict) and isinstance(node, dict):
            return {k: merge(raw_node.get(k), v) for k, v in node.items()}
        if isinstance(raw_node, list) and isinstance(node, list) and len(raw_node) == len(node):
            return [merge(r, v) for r, v in zip(raw_node, node, strict=True)]
        return node

    return merge(raw, resolved)


def _get(cfg: DictConfig, key: str) -> Any:
    return OmegaConf.select(cfg, key, throw_on_missing=False)


def require_int(cfg: DictConfig, key: str, low: int, high: int | None = None, prefix: str = "") -> int:
    value = _get(cfg, key)
    key = prefix + key
    if isinstance(value, bool) or not isinstance(value, int):
        raise SegxError(f"{key}={value!r} must be an integer; set e.g. {key}={low}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise SegxError(f"{key}={value} is out of range; use a value {bound}")
    return value


def require_float(
    cfg: DictConfig, key: str, low: float, high: float, high_open: bool = True, prefix: str = ""
) -> float:
    value = _get(cfg, key)
    key = prefix + key
    interval = f"[{low}, {high}{')' if high_open else ']'}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SegxError(f"{key}={value!r} must be a number in {interval}")
    # NaN compares False with everything, so it would pass the range test below.
    if not math.isfinite(value):
        raise SegxError(f"{key}={value} is not a finite number; use a value in {interval}")
    if value < low or value > high or (high_open and value == high):
        raise SegxError(f"{key}={value} is out of range; use a value in {interval}")
    return float(value)


def require_choice(cfg: DictConfig, key: str, choices: Iterable[str], prefix: str = "") -> str:
    value = _get(cfg, key)
    key = prefix + key
    choices = list(choices)
    if value not in choices:
        hint = suggest(str(value), choices) or f" choose one of {', '.join(choices)}"
        raise SegxError(f"{key}='{value}' is not valid;{hint}")
    return value
