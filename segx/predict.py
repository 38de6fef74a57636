"""Predict masks for a folder of images with an ensemble rebuilt from its MLflow record.

    python -m segx.predict ensemble_run_id=<id> input_dir=scans/ output_dir=masks/ [tta=flip]

Writes ``masks/<stem>.png`` (0/255, at each input's own size), and optionally
``overlays/<stem>.png`` and ``uncertainty/<stem>.png``. Streams the folder in batches, so memory
stays flat however many images there are. Refuses to write into a non-empty ``output_dir``
unless ``overwrite=true``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

from segx.config import exit_on_error, preflight, require_int
from segx.errors import SegxError


def safe_output_path(folder: Path, stem: str, suffix: str = ".png") -> Path:
    """``folder/stem.suffix``, refusing names that would land outside ``folder``."""
    if not stem or "/" in stem or "\\" in stem or stem in (".", "..") or "\x00" in stem:
        raise SegxError(f"input name '{stem}' cannot be used as an output file name; rename the input")
    path = (folder / f"{stem}{suffix}").resolve()
    if path.parent != folder.resolve():
        raise SegxError(f"input name '{stem}' would write outside {folder}; rename the input")
    return path


def load_ensemble(client, run_id: str, workdir: Path, tta: str | None = None):
    """(record, EnsemblePredictor) for an ensemble run, with its members downloaded."""
    from segx import tracking
    from segx.record import validate_record

    run = tracking.get_run(client, run_id)
    if run.data.tags.get(tracking.ROLE) != "ensemble":
        raise SegxError(f"run '{run_id}' is not a segx ensemble (tag {tracking.ROLE}); give an ensemble run ID")
    path = tracking.download(client, run_id, "ensemble.json", workdir)
    try:
        record = json.loads(Path(path).read_text())
    except ValueError:
        raise SegxError(f"run '{run_id}': ensemble.json is not valid JSON; rebuild the ensemble") from None
    validate_record(record, f"run {run_id} ensemble.json")
    model_paths = []
    for i, member in enumerate(record["members"]):
        tracking.get_run(client, member["run_id"])  # exists, not deleted, FINISHED
        model_paths.append(
            tracking.download_member_model(client, member["run_id"], workdir / f"m{i}", member.get("model_artifact", "model"))
        )
    from segx.predictor import EnsemblePredictor

    return record, EnsemblePredictor(record, model_paths, tta)


def check_inputs(input_dir: Path, output_dir: Path) -> dict[str, Path]:
    """The images to predict, by stem; every header is read first, so a corrupt file fails
    the command before any model is loaded or anything is written."""
    from segx.data.folder import list_images
    from segx.data.io import read_size

    if not input_dir.is_dir():
        raise SegxError(f"input_dir={input_dir} does not exist; point it at a folder of images")
    files = list_images(input_dir)
    if not files:
        raise SegxError(f"input_dir={input_dir} holds no images (.png .jpg .tif); add some")
    for stem, path in files.items():
        safe_output_path(output_dir, stem)
        read_size(path)
    return files


def predict_folder(predictor, input_dir: Path, output_dir: Path, batch_size: int, overlays: bool,
                   uncertainty: bool, save_probabilities: bool, on_batch=None, files=None) -> int:  # fmt: skip
    """Write masks (and extras) for every image in ``input_dir``; ``on_batch(n_done)`` is
    called after each batch (the benchmark samples memory there)."""
    import cv2
    from tqdm.auto import tqdm

    from segx.data.io import read_image
    from segx.plots import overlay

    files = files if files is not None else check_inputs(input_dir, output_dir)
    folders = {"masks": True, "overlays": overlays, "uncertainty": uncertainty, "probabilities": save_probabilities}
    for name, wanted in folders.items():
        if wanted:
            (output_dir / name).mkdir(parents=True, exist_ok=True)
    items = list(files.items())
    with tqdm(total=len(items), desc="predicting", unit="img", disable=None) as bar:
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            images = [read_image(p) for _, p in chunk]
            for (stem, _), image, pred in zip(chunk, images, predictor.predict(images), strict=True):
                cv2.imwrite(str(safe_output_path(output_dir / "masks", stem)), pred.mask.astype(np.uint8) * 255)
                if overlays:
                    cv2.imwrite(str(safe_output_path(output_dir / "overlays", stem)),
                                cv2.cvtColor(overlay(image, pred.mask), cv2.COLOR_RGB2BGR))
                if uncertainty:
                    cv2.imwrite(str(safe_output_path(output_dir / "uncertainty", stem)),
                                np.clip(pred.uncertainty * 510, 0, 255).astype(np.uint8))
                if save_probabilities:
                    cv2.imwrite(str(safe_output_path(output_dir / "probabilities", stem)),
                                np.clip(np.rint(pred.probability * 255), 0, 255).astype(np.uint8))
            bar.update(len(chunk))
            if on_batch is not None:
                on_batch(start + len(chunk))
    return len(items)


def run_predict(cfg: DictConfig) -> int:
    for key in ("ensemble_run_id", "input_dir", "output_dir"):
        if OmegaConf.is_missing(cfg, key):
            raise SegxError(f"{key} is not set; pass {key}=...")
    require_int(cfg, "batch_size", 1)
    if cfg.tta not in (None, "none", "flip"):
        raise SegxError(f"tta={cfg.tta} is not valid; use none or flip")
    input_dir, output_dir = Path(str(cfg.input_dir)), Path(str(cfg.output_dir))
    if output_dir.exists() and any(output_dir.iterdir()) and not cfg.overwrite:
        raise SegxError(f"output_dir={output_dir} is not empty; choose a new folder or pass overwrite=true")
    files = check_inputs(input_dir, output_dir)  # before any model is downloaded or loaded
    from segx import tracking

    client = tracking.connect(str(cfg.mlflow.tracking_uri))
    workdir = Path(cfg.paths.output_dir) / "cache" / "ensembles" / str(cfg.ensemble_run_id)
    record, predictor = load_ensemble(client, str(cfg.ensemble_run_id), workdir, cfg.tta)
    n = predict_folder(predictor, input_dir, output_dir, int(cfg.batch_size), bool(cfg.overlays),
                       bool(cfg.uncertainty), bool(cfg.save_probabilities), files=files)  # fmt: skip
    (output_dir / "ensemble.json").write_text(json.dumps({**record, "predict_tta": predictor.tta, "run_id": str(cfg.ensemble_run_id)}, indent=2))
    print(f"segx: wrote {n} masks to {output_dir / 'masks'}", flush=True)
    return n


@hydra.main(version_base="1.3", config_path="../conf", config_name="predict")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        run_predict(cfg)
    except SegxError as exc:
        exit_on_error(exc)


def main() -> None:
    preflight("predict")
    _hydra_main()


if __name__ == "__main__":
    sys.exit(main())
