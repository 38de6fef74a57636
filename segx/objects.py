"""Objects built from YAML (``_target_``), safely: a name is checked by the class it resolves to
and the kind its place in the config needs (optimizer, schedule, callback, albumentations
transform), nested ``_target_``s and ``_args_`` included, before anything is created; then
segx builds the checked classes itself. TensorFlow is imported (through segx.backend) only to
check or build a ``tf_keras`` object."""

from __future__ import annotations

import inspect
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from segx.errors import SegxError, suggest

# A config is data. `_target_` would otherwise call anything importable (os.system, or any
# function under an allowed package, e.g. segx.tracking.mlflow.delete_run) with arguments
# from the config. So a name is checked by what it resolves to, not by how it is spelt: it
# must be a class of the kind its place in the config needs, from that kind's package. Names
# are looked up only inside these packages (importing a module runs its code).
IMPORTABLE_TARGET_PREFIXES = ("albumentations.", "tf_keras.", "segx.")
# Users copy Keras snippets; segx runs on tf-keras, so these spellings mean the same classes.
KERAS_ALIASES = {"keras.": "tf_keras.", "tensorflow.keras.": "tf_keras.", "tf.keras.": "tf_keras."}
# Hydra's instantiate options: segx builds objects itself, with the arguments as given (no
# partial objects, no half-built nodes), so a config must not ask for anything else.
REFUSED_KEYS = ("_partial_", "_recursive_", "_convert_")


@dataclass(frozen=True)
class TargetKind:
    noun: str  # "an optimizer class"
    bases: tuple[str, ...]  # the class must subclass one of these
    package: str  # and be named from here (so not segx's own subclasses)
    advice: str  # what to use instead, for the error message


TARGET_KINDS = {
    "optimizer": TargetKind(
        "an optimizer class",
        ("tf_keras.optimizers.Optimizer", "tf_keras.optimizers.legacy.Optimizer"),
        "tf_keras.optimizers.",
        "use a class from tf_keras.optimizers (e.g. tf_keras.optimizers.Adam)",
    ),
    "schedule": TargetKind(
        "a learning-rate schedule class",
        ("tf_keras.optimizers.schedules.LearningRateSchedule",),
        "tf_keras.optimizers.schedules.",
        "use a class from tf_keras.optimizers.schedules (e.g. tf_keras.optimizers.schedules.ExponentialDecay)",
    ),
    "callback": TargetKind(
        "a callback class",
        ("tf_keras.callbacks.Callback",),
        "tf_keras.callbacks.",
        "use a class from tf_keras.callbacks (e.g. tf_keras.callbacks.ReduceLROnPlateau)",
    ),
    "transform": TargetKind(
        "an albumentations transform class",
        ("albumentations.BasicTransform", "albumentations.BaseCompose"),
        "albumentations.",
        "use a transform from albumentations (e.g. albumentations.HorizontalFlip)",
    ),
}
# The only places segx builds objects from its own config: (kind there, kinds its arguments
# may build). An optimizer's learning_rate may be a schedule; Compose/OneOf hold transforms.
# trainer.lr_schedule is passed to Keras' fit as an extra callback (segx/training/member.py).
TARGET_PLACES = {
    "trainer.optimizer": ("optimizer", ("schedule",)),
    "trainer.lr_schedule": ("callback", ()),
    "augment.transforms": ("transform", ("transform",)),
}
# Subclasses of an allowed kind that still reach outside the run.
REFUSED_CLASSES = {
    "tf_keras.src.callbacks.RemoteMonitor": "it posts training logs to a URL",
    "tf_keras.src.callbacks.LambdaCallback": "it exists to call functions, which a config cannot hold",
}
# Classes that read their **kwargs themselves instead of passing them on: the extra names
# they accept (other names are refused by the class, or worse, silently ignored).
KWARGS_READ_BY = {
    "tf_keras.src.optimizers.optimizer._BaseOptimizer": (),  # `lr` is ignored there, with a warning
    "tf_keras.src.optimizers.legacy.optimizer_v2.OptimizerV2": (
        "clipnorm",
        "clipvalue",
        "lr",
        "decay",
        "global_clipnorm",
    ),
    "tf_keras.src.callbacks.ReduceLROnPlateau": ("epsilon",),
    "tf_keras.src.callbacks.ModelCheckpoint": ("load_weights_on_restart", "period"),
    "tf_keras.src.callbacks.TensorBoard": ("write_grads", "embeddings_layer_names", "embeddings_data", "batch_size"),
    "albumentations.core.composition.BaseCompose": (),
}
LEARNING_RATE_ARGS = ("learning_rate", "initial_learning_rate")


@dataclass
class _Spec:
    """A checked ``_target_`` node: the class itself, so building never looks the name up again."""

    cls: type
    name: str
    args: list
    kwargs: dict


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _normalise_target(target: str) -> str:
    for alias, real in KERAS_ALIASES.items():
        if target.startswith(alias):
            return real + target[len(alias) :]
    return target


def _place(key: str) -> tuple[tuple[str, ...], tuple[str, ...], bool]:
    """(kinds allowed at ``key``, kinds allowed in its arguments, whether ``key`` is the place itself)."""
    for place, (kind, nested) in TARGET_PLACES.items():
        if key == place or key.startswith(place + "["):
            return (kind,), nested, True
        if key.startswith(place + "."):
            return nested, nested, False
    return (), (), False


def _advice(kinds: Sequence[str]) -> str:
    if not kinds:
        return f"segx builds objects only at {', '.join(TARGET_PLACES)}"
    return "; or ".join(TARGET_KINDS[k].advice for k in kinds)


def _nouns(kinds: Sequence[str]) -> str:
    return " or ".join(TARGET_KINDS[k].noun for k in kinds)


def _import_path(name: str) -> Any:
    """The object a dotted name means, as Hydra finds it (import the package, then attributes,
    importing submodules where an attribute is missing). Raises LookupError(parent, parent
    name, part) for a missing name, TypeError for a path through something else."""
    import importlib

    parts = name.split(".")
    if parts[0] == "tf_keras":
        import segx.backend  # noqa: F401  (TF's environment and log levels come first)
    obj = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], 1):
        if not (inspect.ismodule(obj) or inspect.isclass(obj)):
            # Attributes of modules and classes only: a property of some object could run code.
            raise TypeError(f"{'.'.join(parts[:i])} is neither a module nor a class")
        try:
            obj = getattr(obj, part)
            continue
        except Exception:  # noqa: BLE001 - lazy modules raise more than AttributeError
            pass
        if inspect.ismodule(obj):
            try:
                obj = importlib.import_module(".".join(parts[: i + 1]))
                continue
            except ImportError:
                pass
        raise LookupError(obj, ".".join(parts[:i]), part)
    return obj


def _kinds_of(cls: type) -> list[str]:
    """The kinds ``cls`` belongs to, among those whose package is already imported."""
    found = []
    for kind, spec in TARGET_KINDS.items():
        if all(base.split(".")[0] in sys.modules for base in spec.bases):
            if issubclass(cls, tuple(_import_path(b) for b in spec.bases)):
                found.append(kind)
    return found


def _resolve_target(name: str, key: str, kinds: Sequence[str]) -> type:
    """The class ``name`` means, if it is one of ``kinds``; else one line naming ``key``."""
    where = f"{key}._target_='{name}'"
    if not kinds:
        raise SegxError(f"{where} is not allowed here: {_advice(kinds)}; remove it")
    if not name.startswith(IMPORTABLE_TARGET_PREFIXES) or any(
        not p.isidentifier() or p.startswith("_") for p in name.split(".")
    ):
        raise SegxError(f"{where} is not allowed; segx builds only {_nouns(kinds)} here: {_advice(kinds)}")
    try:
        obj = _import_path(name)
    except LookupError as exc:
        parent, parent_name, part = exc.args
        public = [n for n in dir(parent) if not n.startswith("_")]
        hint = suggest(part, public)
        hint = f" did you mean '{parent_name}.{hint.split(chr(39))[1]}'?" if hint else f" {_advice(kinds)}"
        raise SegxError(f"{where} does not exist ({parent_name} has no '{part}');{hint}") from None
    except (ImportError, TypeError) as exc:
        raise SegxError(f"{where} does not name a class ({exc}); {_advice(kinds)}") from None
    if not inspect.isclass(obj):
        what = "a module" if inspect.ismodule(obj) else "a function" if callable(obj) else f"a {type(obj).__name__}"
        raise SegxError(f"{where} is {what}, not {_nouns(kinds)}; {_advice(kinds)}")
    wanted = [base for kind in kinds for base in TARGET_KINDS[kind].bases]
    if not issubclass(obj, tuple(_import_path(b) for b in wanted)):
        actual = [k for k in _kinds_of(obj) if k not in kinds]
        what = TARGET_KINDS[actual[0]].noun if actual else f"the class {_qualified(obj)}"
        advice = _advice(kinds)
        if actual[:1] == ["schedule"] and "callback" in kinds:
            advice = "a schedule goes in trainer.optimizer.learning_rate (with trainer.lr_schedule=null)"
        raise SegxError(f"{where} is {what}, not {_nouns(kinds)}; {advice}")
    if not any(name.startswith(TARGET_KINDS[k].package) for k in kinds):
        # segx's own subclasses (e.g. its training callback) are built by segx, never from YAML
        raise SegxError(f"{where} is not allowed; segx builds only {_nouns(kinds)} here: {_advice(kinds)}")
    for cls in obj.__mro__:
        if _qualified(cls) in REFUSED_CLASSES:
            raise SegxError(f"{where} is not allowed: {REFUSED_CLASSES[_qualified(cls)]}; {_advice(kinds)}")
    return obj


def _accepted_names(cls: type) -> set[str] | None:
    """Keyword arguments ``cls`` accepts, following **kwargs up the base classes; None when
    they end up somewhere this cannot see (then any name is let through)."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        if klass is object:
            return None
        try:
            params = list(inspect.signature(init).parameters.values())
        except (TypeError, ValueError):
            return None
        names |= {p.name for p in params[1:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if _qualified(klass) in KWARGS_READ_BY:
            return names | set(KWARGS_READ_BY[_qualified(klass)])
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            return names
    return None


def _check_arguments(cls: type, name: str, args: list, kwargs: dict, key: str) -> None:
    """Argument names against the class's signature (with a suggestion), and the values that
    would otherwise fail only once training starts."""
    accepted = _accepted_names(cls)
    if accepted is not None:
        for arg in kwargs:
            if arg not in accepted:
                hint = (
                    " did you mean 'learning_rate'?"
                    if arg == "lr" and "learning_rate" in accepted
                    else suggest(arg, accepted)
                )
                raise SegxError(
                    f"{key}.{arg} is not an argument of {name};{hint or ' it takes ' + ', '.join(sorted(accepted))}"
                )
    try:
        signature = inspect.signature(cls)
    except (TypeError, ValueError):
        return
    try:
        bound = signature.bind_partial(*args, **kwargs)
    except TypeError as exc:
        raise SegxError(f"{key}: {name} does not take these arguments ({exc}); fix them in the config") from None
    positional = list(signature.parameters)
    for arg, value in bound.arguments.items():
        param = signature.parameters[arg]
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        where = f"{key}.{arg}" if arg in kwargs else f"{key}._args_[{positional.index(arg)}] ({arg})"
        if arg in LEARNING_RATE_ARGS:
            if isinstance(value, dict) and "_target_" in value:
                continue  # a schedule: checked as a nested object
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise SegxError(
                    f"{where}={value!r} must be a positive number (e.g. 0.001) or a schedule with "
                    "_target_ from tf_keras.optimizers.schedules"
                )
        default = param.default
        if isinstance(default, (int, float)) and not isinstance(default, bool) and isinstance(value, str):
            raise SegxError(f"{where}={value!r} must be a number (its default is {default})")


def _check_tree(value: Any, key: str, kinds: Sequence[str], nested: Sequence[str], top: bool, objects: bool) -> Any:
    """Copy of a plain ``value`` with every ``_target_`` checked; ``_Spec``s when ``objects``."""
    value = _plain(value)
    if isinstance(value, dict):
        for special in REFUSED_KEYS:
            if special in value:
                raise SegxError(f"{key}.{special} is not supported: segx builds each object as given; remove it")
        if "_target_" in value:
            return _check_object(value, key, kinds, nested, objects)
        if top and kinds:
            raise SegxError(f"{key} has no _target_; give {_nouns(kinds)}: {_advice(kinds)}")
        return {k: _check_tree(v, f"{key}.{k}", kinds, nested, False, objects) for k, v in value.items()}
    if isinstance(value, list):
        return [_check_tree(v, f"{key}[{i}]", kinds, nested, top, objects) for i, v in enumerate(value)]
    if isinstance(value, float) and math.isnan(value):
        raise SegxError(f"{key}=nan is not a number; give a finite value")
    if top and kinds and (value is not None or key.endswith("]")):
        raise SegxError(f"{key}={value!r} is not an object; give {_nouns(kinds)} with _target_: {_advice(kinds)}")
    return value


def _check_object(node: dict, key: str, kinds: Sequence[str], nested: Sequence[str], objects: bool) -> Any:
    name = _normalise_target(str(node["_target_"]))
    cls = _resolve_target(name, key, kinds)
    args = node.get("_args_", [])
    if not isinstance(args, list):
        raise SegxError(f"{key}._args_={args!r} must be a list of positional arguments")
    kwargs = {k: v for k, v in node.items() if k not in ("_target_", "_args_")}
    _check_arguments(cls, name, args, kwargs, key)
    args = [_check_tree(v, f"{key}._args_[{i}]", nested, nested, False, objects) for i, v in enumerate(args)]
    kwargs = {k: _check_tree(v, f"{key}.{k}", nested, nested, False, objects) for k, v in kwargs.items()}
    if objects:
        return _Spec(cls, name, args, kwargs)
    return {"_target_": name, **({"_args_": args} if "_args_" in node else {}), **kwargs}


def _plain(node: Any) -> Any:
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    return node


def checked_container(node: Any, key: str) -> Any:
    """Plain dict/list copy of ``node`` (the config at ``key``) with every ``_target_`` checked:
    each must name a class of the kind allowed there (see TARGET_PLACES), nested ones and
    ``_args_`` included, with argument names and learning rates checked against the class.
    Raises SegxError naming the key; imports TensorFlow only when a tf_keras name is given."""
    kinds, nested, top = _place(key)
    return _check_tree(_plain(node), key, kinds, nested, top, objects=False)


def check_no_stray_targets(cfg: DictConfig, skip: Iterable[str] = ()) -> None:
    """Refuse ``_target_`` outside the places segx builds objects: nothing would build it there,
    so it is a mistake (or an attempt to get something built); say so before anything runs."""
    try:
        plain = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # noqa: BLE001 - an unresolvable value is reported by the check that reads it
        plain = OmegaConf.to_container(cfg, resolve=False)
    skip = set(skip) | set(TARGET_PLACES) | {"hydra"}

    def walk(value: Any, key: str) -> None:
        if key in skip:
            return
        if isinstance(value, dict):
            if "_target_" in value:
                raise SegxError(f"{key}._target_ is not allowed here: {_advice(())}; remove it")
            for k, v in value.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, f"{key}[{i}]")

    walk(plain, "")


def _build(value: Any, key: str) -> Any:
    if isinstance(value, _Spec):
        args = [_build(v, f"{key}._args_[{i}]") for i, v in enumerate(value.args)]
        kwargs = {k: _build(v, f"{key}.{k}") for k, v in value.kwargs.items()}
        try:
            return value.cls(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any failure of a library constructor: one line
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [""]
            detail = "; ".join(lines[:3]) if "validation error" in lines[0] else lines[0]
            raise SegxError(
                f"{key}: cannot build {value.name} ({type(exc).__name__}: {detail}); fix its arguments in the config"
            ) from None
    if isinstance(value, dict):
        return {k: _build(v, f"{key}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_build(v, f"{key}[{i}]") for i, v in enumerate(value)]
    return value


def instantiate(node: Any, key: str) -> Any:
    """Build the object the config at ``key`` describes, after :func:`checked_container`'s checks.

    segx builds it itself from the checked classes (not with ``hydra.utils.instantiate``): the
    names are not looked up a second time, and no string is read as an interpolation again.
    """
    return _build(_check_tree(_plain(node), key, *_place(key), objects=True), key)


def build_augmentation(transforms: Sequence | None, key: str = "augment.transforms"):
    """An albumentations ``Compose`` over image and mask from a list of ``_target_`` dicts (may be
    empty); each transform is checked and built as :func:`instantiate` does."""
    import albumentations as A

    built = [instantiate(t, f"{key}[{i}]") for i, t in enumerate(transforms or [])]
    return A.Compose(built, p=1.0)
