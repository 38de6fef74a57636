"""Predicting a folder of images with an :class:`~segx.inference.predictor.EnsemblePredictor`
(``python -m segx.predict`` is the command; this is the library).

Writes ``masks/<stem>.png`` (0/255, at each input's own size; for several classes the label map
in the data's own encoding: data.labels' mask values, or data.palette's colours), optionally
``overlays/<stem>.png``, ``uncertainty/<stem>.png`` and ``probabilities/<stem>.png`` (several
classes: a folder per case, ``probabilities/<stem>/<class>.png``, as MONAI's SaveImage keeps one
folder per subject: no stem and class can make the name of another's map), the ensemble's record
``ensemble.json`` and ``segx-manifest.json``, the list of every file written.

How the user's files are kept safe:

- ``output_dir`` may not be, contain or lie inside ``input_dir`` (real paths compared, links
  followed; for a folder not made yet, its nearest existing parent), whatever ``overwrite`` says.
- A non-empty ``output_dir`` is refused unless ``overwrite=true``, and even then only when it is
  an earlier segx prediction (it holds ``segx-manifest.json``). Overwriting removes exactly the
  files that manifest lists, so no stale mask is left beside the new ones and a file segx did not
  write is never touched (one that a new output would replace is refused up front).
- Every input is checked before any model is loaded: listing, header, size limit, content
  matching the extension (a JPEG named ``.png``), and the PNG/JPEG end marker (truncation).
  Decoding every input up front as well was measured at 1-16 ms per 256-1024 px image but
  0.2-0.5 s per 4096 px one, doubling the run for large scans, so it is not done; instead:
- The run writes into ``output_dir/.segx-partial-<pid>-*`` and only moves its files into place
  once every input has been predicted. A failure before that (an input that fails to decode,
  Ctrl-C, a full disk) removes the partial folder, and ``output_dir`` if this run created it:
  the folder is exactly as before and the same command can be rerun. A partial folder left by
  a killed process is removed by the next run.
- Moving into place: the manifest is first rewritten to list old and new files, then each file
  is renamed over its final name (atomic: a reader sees the old file or the new one; the old one
  is kept as a hard link in the partial folder), then old files the new run did not write are
  moved into the partial folder and the manifest is rewritten with the new list. A failure on
  the way (an error, a signal) undoes every step: the old files and manifest go back, the new
  ones and the folders made for them are removed, and ``output_dir`` is exactly as before. A
  crash (SIGKILL, power) at any point leaves a folder whose manifest lists every segx file in
  it, so ``overwrite=true`` can always replace it.

Images are read in batches bounded by count (``batch_size``) and by total input pixels
(``batch_pixels``; a larger image goes alone), so memory stays flat however many and however
large the inputs. File names that are not valid UTF-8 are read and written with the same bytes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from segx.data import staging
from segx.data.io import shown
from segx.ensembling.task import task_for
from segx.errors import SegxError
from segx.inference import owned

MANIFEST = "segx-manifest.json"


RECORD = "ensemble.json"


OUTPUT_FOLDERS = ("masks", "overlays", "uncertainty", "probabilities")


PARTIAL_PREFIX = ".segx-partial-"


DEFAULT_BATCH_PIXELS = 16_000_000


class InputImage(NamedTuple):
    path: Path
    pixels: int  # width x height from the header: what a batch's memory budget counts


def safe_output_path(folder: Path, stem: str, suffix: str = ".png") -> Path:
    """``folder/stem.suffix``, refusing names that would land outside ``folder``."""
    if not stem or "/" in stem or "\\" in stem or stem in (".", "..") or "\x00" in stem:
        raise SegxError(f"input name '{shown(stem)}' cannot be used as an output file name; rename the input")
    path = (folder / f"{stem}{suffix}").resolve()
    if path.parent != folder.resolve():
        raise SegxError(f"input name '{shown(stem)}' would write outside {shown(folder)}; rename the input")
    return path


def check_inputs(
    input_dir: Path, output_dir: Path, max_pixels: int | None = None, limit_key: str = "max_pixels"
) -> dict[str, InputImage]:
    """The images to predict, by stem. Every file's header, format and end marker is checked
    here, so a bad file fails the command before any model is loaded or anything is written."""
    from segx.data.folder import list_images
    from segx.data.io import DEFAULT_MAX_PIXELS, read_size

    max_pixels = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    if not input_dir.exists():
        raise SegxError(f"input_dir={shown(input_dir)} does not exist; point it at a folder of images")
    if not input_dir.is_dir():
        raise SegxError(
            f"input_dir={shown(input_dir)} is a file, not a folder; point input_dir at the "
            f"folder that holds it ({shown(input_dir.parent)})"
        )
    files = list_images(input_dir)
    if not files:
        raise SegxError(f"input_dir={shown(input_dir)} holds no images (.png .jpg .tif); add some")
    checked = {}
    for stem, path in files.items():
        safe_output_path(output_dir, stem)
        width, height = read_size(path, max_pixels, limit_key=limit_key)
        checked[stem] = InputImage(path, width * height)
    return checked


def _real(path: Path) -> Path:
    # realpath follows every link of the part that exists and appends the rest as written.
    return Path(os.path.realpath(path))


def check_output_location(input_dir: Path, output_dir: Path) -> None:
    """Refuse an ``output_dir`` that is, contains or lies inside ``input_dir``: writing or
    overwriting there could replace the scans being predicted."""
    source, target = _real(input_dir), _real(output_dir)
    fix = "choose an output_dir outside the input folder"
    if target == source:
        raise SegxError(f"output_dir={shown(output_dir)} is the input folder ({shown(source)}); {fix}")
    if target.is_relative_to(source):
        raise SegxError(f"output_dir={shown(output_dir)} lies inside input_dir ({shown(source)}); {fix}")
    if source.is_relative_to(target):
        raise SegxError(f"output_dir={shown(output_dir)} contains input_dir ({shown(source)}); {fix}")
    if output_dir.is_symlink() and not output_dir.exists():
        raise SegxError(f"output_dir={shown(output_dir)} is a broken link; remove it or give another folder")
    if output_dir.exists() and not output_dir.is_dir():
        raise SegxError(f"output_dir={shown(output_dir)} is a file, not a folder; give a folder")


def _prediction_path(parts: list[str]) -> bool:
    """``ensemble.json``, ``<output folder>/<name>`` or ``probabilities/<stem>/<name>`` (a class's map)."""
    if parts == [RECORD]:
        return True
    if parts[0] not in OUTPUT_FOLDERS:
        return False
    return len(parts) == 2 or (len(parts) == 3 and parts[0] == "probabilities")


# What a prediction folder holds: a manifest entry names a file segx may write only if it is one of
# these (a hand-edited manifest cannot make segx delete anything else).
LAYOUT = owned.Layout(MANIFEST, PARTIAL_PREFIX, _prediction_path, OUTPUT_FOLDERS)


def read_manifest(output_dir: Path) -> list[str] | None:
    """The files an earlier segx prediction wrote into ``output_dir``; None when it holds none."""
    path = output_dir / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        if manifest.get("format") != "segx-prediction" or not isinstance(files, list):
            raise ValueError
    except (ValueError, KeyError, TypeError, OSError):
        raise SegxError(
            f"{shown(path)} is not a readable segx manifest; remove the earlier "
            "prediction by hand or choose a new output_dir"
        ) from None
    return [f for f in files if LAYOUT.owns(f)]


def check_output_dir(input_dir: Path, output_dir: Path, overwrite: bool, planned: Iterable[str] = ()) -> list[str]:
    """Refuse an output location that could lose a file that is not segx's own output; return
    the files of the earlier prediction that ``overwrite=true`` replaces ([] for a new folder).
    ``planned``: the files this run will write, relative to ``output_dir``."""
    check_output_location(input_dir, output_dir)
    if not output_dir.exists():
        return []
    try:
        entries = list(os.scandir(output_dir))
    except OSError as exc:
        raise SegxError(f"cannot read output_dir={shown(output_dir)} ({exc.strerror}); check its permissions") from None
    content = []
    for entry in entries:
        if LAYOUT.is_partial(entry.name):
            continue  # a run in progress or a killed one's leftovers: segx's, removed when stale
        if entry.name in OUTPUT_FOLDERS and entry.is_dir(follow_symlinks=False) and not any(os.scandir(entry.path)):
            continue  # an empty output folder (older versions left them after a crash)
        content.append(entry.name)
    if not content:
        return []
    old = read_manifest(output_dir)
    if not overwrite:
        what = "an earlier segx prediction" if old is not None else "files"
        raise SegxError(
            f"output_dir={shown(output_dir)} is not empty (it holds {what}); choose a new folder "
            "or pass overwrite=true to replace a segx prediction"
        )
    if old is None:
        raise SegxError(
            f"output_dir={shown(output_dir)} is not empty and is not a segx prediction folder "
            f"(no {MANIFEST}); overwrite=true replaces only segx's own output: choose a new "
            "or empty folder"
        )
    for name in OUTPUT_FOLDERS:
        sub = output_dir / name
        if sub.is_symlink() or (sub.exists() and not sub.is_dir()):
            raise SegxError(f"{shown(sub)} is a link or a file, not segx's output folder; move it away")
    known = set(old)
    for rel in planned:
        target = output_dir / rel
        if rel not in known and os.path.lexists(target):
            raise SegxError(
                f"{shown(target)} was not written by segx and would be replaced; move it away or choose a new output_dir"
            )
        if target.is_dir() and not target.is_symlink():
            raise SegxError(f"{shown(target)} is a folder where segx writes a file; move it away")
        case = target.parent  # probabilities/<stem>/ of several classes: a real folder or none
        if case.parent.name == "probabilities" and (case.is_symlink() or (case.exists() and not case.is_dir())):
            raise SegxError(f"{shown(case)} is a link or a file, not segx's folder of this case's maps; move it away")
    return old


def _write_manifest(output_dir: Path, files: Iterable[str], complete: bool) -> None:
    manifest = {"format": "segx-prediction", "complete": complete, "files": sorted(set(files))}
    # ensure_ascii keeps a name that is not UTF-8 (a surrogate escape) as \udcXX, read back as is.
    owned.write_atomic(output_dir / MANIFEST, json.dumps(manifest, indent=1))


def _commit(stage: Path, output_dir: Path, new: list[str], old: list[str]) -> None:
    """Move the staged files into ``output_dir`` and remove the earlier prediction's others, all
    or nothing (module docstring; :func:`segx.inference.owned.commit_files`)."""
    owned.commit_files(stage, output_dir, new, old, LAYOUT, _write_manifest)


def _batches(items: list[tuple[str, InputImage]], batch_size: int, batch_pixels: int) -> Iterator[list]:
    """Consecutive batches of at most ``batch_size`` images and ``batch_pixels`` input pixels
    (an image over the budget goes alone)."""
    batch, pixels = [], 0
    for item in items:
        if batch and (len(batch) >= batch_size or pixels + item[1].pixels > batch_pixels):
            yield batch
            batch, pixels = [], 0
        batch.append(item)
        pixels += item[1].pixels
    if batch:
        yield batch


@dataclass(frozen=True)
class PredictOutputs:
    """What :func:`predict_folder` writes beside the masks, and whether it may replace an earlier
    prediction (``overwrite``): read once by the command from its config."""

    overlays: bool = False
    uncertainty: bool = False
    save_probabilities: bool = False
    overwrite: bool = False


@dataclass(frozen=True)
class Batching:
    """How the inputs are read: batches of at most ``batch_size`` images and ``batch_pixels``
    input pixels (an image over the budget goes alone), no image over ``max_pixels`` (None: the
    default of :mod:`segx.data.io`); ``on_batch(n_done)`` is called after each batch (the
    benchmark samples memory there)."""

    batch_size: int
    batch_pixels: int = DEFAULT_BATCH_PIXELS
    max_pixels: int | None = None
    on_batch: Callable[[int], object] | None = None


def planned_files(
    stems: Iterable[str], outputs: PredictOutputs, record: bool = True, classes: Iterable[str] | None = None
) -> list[str]:
    """The files a prediction writes, relative to ``output_dir`` (``classes``: a multi-class
    ensemble's foreground class names, one probability map each)."""
    stems = list(stems)
    extras = (True, outputs.overlays, outputs.uncertainty, outputs.save_probabilities)
    folders = [
        name
        for name, wanted in zip(OUTPUT_FOLDERS, extras, strict=True)
        if wanted and not (name == "probabilities" and classes is not None)
    ]
    files = [f"{name}/{stem}.png" for name in folders for stem in stems]
    if outputs.save_probabilities and classes is not None:  # a folder per case: no stem and class collide
        files += [f"probabilities/{stem}/{c}.png" for stem in stems for c in classes]
    return files + ([RECORD] if record else [])


def predict_folder(
    predictor,
    input_dir: Path,
    output_dir: Path,
    outputs: PredictOutputs,
    batching: Batching,
    files: dict[str, InputImage] | None = None,
    record: dict | None = None,
) -> int:
    """Write masks (and ``outputs``' extras, and ``record`` as ``ensemble.json``) for every image
    in ``input_dir`` (``files``: those :func:`check_inputs` found there, when already checked),
    staged and then moved into ``output_dir`` (module docstring)."""
    from tqdm.auto import tqdm

    from segx.progress import interactive
    from segx.progress import stage as say

    files = files if files is not None else check_inputs(input_dir, output_dir, batching.max_pixels)
    planes = predictor.task.probability_planes
    new = planned_files(files, outputs, record is not None, None if planes is None else [n for _, n in planes])
    if len(set(new)) != len(new):  # two outputs of one name: one would be lost (a bug, never a user's error)
        raise AssertionError(f"two outputs named {next(f for f in new if new.count(f) > 1)}")
    old = check_output_dir(input_dir, output_dir, outputs.overwrite, new)
    entered = False  # the staging folder exists (else output_dir could not be written at all)
    try:
        with staging.staged_folder(output_dir, PARTIAL_PREFIX) as stage:
            entered = True
            items = list(files.items())
            if not interactive():  # a log: one line, not a bar redrawn per batch
                say(f"predicting {len(items)} images")
            with tqdm(total=len(items), desc="segx: predicting", unit="img", disable=not interactive()) as bar:
                done = 0
                for batch in _batches(items, batching.batch_size, batching.batch_pixels):
                    _predict_batch(predictor, batch, stage, outputs, batching.max_pixels)
                    done += len(batch)
                    bar.update(len(batch))
                    if batching.on_batch is not None:
                        batching.on_batch(done)
            if record is not None:
                owned.write_atomic(stage / RECORD, json.dumps(record, indent=2))
            # Someone may have written into output_dir meanwhile: check again just before moving.
            old = check_output_dir(input_dir, output_dir, outputs.overwrite, new)
            _commit(stage, output_dir, new, old)
    except OSError as exc:  # a full disk, a folder made read-only meanwhile, or none to write into
        if not entered:
            raise SegxError(
                f"cannot write into output_dir={shown(output_dir)} ({exc.strerror or exc}); choose a writable folder"
            ) from None
        raise SegxError(
            f"writing into output_dir={shown(output_dir)} failed ({exc.strerror or exc}); it is as it was: "
            "free space or fix permissions and run again"
        ) from None
    return len(items)


def _predict_batch(predictor, batch, stage: Path, outputs: PredictOutputs, max_pixels: int | None) -> None:
    import cv2

    from segx.data.io import DEFAULT_MAX_PIXELS, read_image, write_png
    from segx.inference.overlay import overlay

    limit = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    images = [read_image(item.path, limit, limit_key="max_pixels") for _, item in batch]
    predictions = predictor.predict(images)
    labels = getattr(predictor, "labels", None)
    for i, (stem, _) in enumerate(batch):
        image, pred = images[i], predictions[i]
        if labels is not None:  # several classes: the user's own encoding, a legend, one map per class
            _write_classes(labels, stem, image, pred, stage, outputs)
            images[i] = predictions[i] = None
            continue
        arrays = {"masks": pred.mask.astype(np.uint8) * 255}
        if outputs.overlays:
            arrays["overlays"] = cv2.cvtColor(overlay(image, pred.mask), cv2.COLOR_RGB2BGR)
        if outputs.uncertainty:
            arrays["uncertainty"] = np.clip(pred.uncertainty * 510, 0, 255).astype(np.uint8)
        if outputs.save_probabilities:
            arrays["probabilities"] = np.clip(np.rint(pred.probability * 255), 0, 255).astype(np.uint8)
        for name, array in arrays.items():
            (stage / name).mkdir(exist_ok=True)
            write_png(safe_output_path(stage / name, stem), array)
        images[i] = predictions[i] = None  # this image's full-size arrays can go now


def _write_classes(labels, stem: str, image, pred, stage: Path, outputs: PredictOutputs):
    """One image of a multi-class ensemble: ``masks/<stem>.png`` in the data's own encoding (the
    mask values of data.labels, 16-bit where a value needs it, or the palette's colours), the
    overlay with a legend, the uncertainty (normalised entropy x 255) and, on request, one
    probability map per foreground class (``probabilities/<stem>/<class>.png``, 0..255)."""
    import cv2

    from segx.data.io import write_png
    from segx.inference.overlay import class_colours, overlay_classes

    encoded = labels.decode(pred.mask)
    arrays = {"masks": cv2.cvtColor(encoded, cv2.COLOR_RGB2BGR) if encoded.ndim == 3 else encoded}
    if outputs.overlays:
        colours = class_colours(labels.n_classes, labels.colours)
        arrays["overlays"] = cv2.cvtColor(overlay_classes(image, pred.mask, labels.names, colours), cv2.COLOR_RGB2BGR)
    if outputs.uncertainty:
        arrays["uncertainty"] = np.clip(np.rint(pred.uncertainty * 255), 0, 255).astype(np.uint8)
    for name, array in arrays.items():
        (stage / name).mkdir(exist_ok=True)
        write_png(safe_output_path(stage / name, stem), array)
    if outputs.save_probabilities:
        (stage / "probabilities").mkdir(exist_ok=True)
        case = safe_output_path(stage / "probabilities", stem, "")
        case.mkdir()
        # One map per foreground class, or per region (its own sigmoid) for a region ensemble.
        for c, name in task_for(labels).probability_planes:
            plane = np.clip(np.rint(pred.probability[..., c] * 255), 0, 255).astype(np.uint8)
            write_png(safe_output_path(case, name), plane)
