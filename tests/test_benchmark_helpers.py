"""segx.benchmark.helpers, the helpers the study and the scripts under experiments/ share: each on
real files in a temporary folder, no TensorFlow and no network built."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

from segx.benchmark.helpers import machine, read_results, spread, subset_folder, write_results
from segx.errors import SegxError

STRATA = {"fluorescence": 12, "brightfield": 6, "histology": 6}  # 24 cases


def make_dataset(root: Path, strata: dict[str, int] = STRATA) -> list[str]:
    """A dataset folder as the study reads it: train_images/<stem>.png and train_masks/<stem>.png
    (the file's bytes name the case and the kind), metadata.csv with a float column as written."""
    lines = ["split,stem,width,height,fg_fraction,appearance"]
    stems = []
    for appearance, count in strata.items():
        for i in range(count):
            stem = f"{appearance[:3]}{i:03d}"
            stems.append(stem)
            lines.append(f"train,{stem},{64 + i},64,0.{i + 1}5,{appearance}")
    for sub in ("train_images", "train_masks"):
        (root / sub).mkdir(parents=True)
        for stem in stems:
            (root / sub / f"{stem}.png").write_text(f"{sub}:{stem}")
    (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    return stems


def picked(target: Path) -> list[list[str]]:
    return [line.split(",") for line in (target / "metadata.csv").read_text().splitlines()[1:]]


# --- subset_folder ---------------------------------------------------------------------------
def test_subset_folder_picks_n_cases_by_stratum_and_keeps_each_image_with_its_mask(tmp_path):
    root = tmp_path / "data"
    stems = make_dataset(root)
    target = subset_folder(root, 12, tmp_path / "work")
    assert target == tmp_path / "work" / "subset-12"
    rows = picked(target)
    chosen = [r[1] for r in rows]
    # round(12 * share): 6 of the 12 fluorescence cases, 3 of each 6-case stratum.
    assert len(chosen) == len(set(chosen)) == 12
    assert set(chosen) <= set(stems)
    by = {a: sum(r[5] == a for r in rows) for a in STRATA}
    assert by == {"fluorescence": 6, "brightfield": 3, "histology": 3}
    for sub in ("train_images", "train_masks"):
        links = sorted(p.name for p in (target / sub).iterdir())
        assert links == sorted(f"{s}.png" for s in chosen)
        for name in links:
            link = target / sub / name
            assert link.is_symlink()
            assert link.read_text() == f"{sub}:{name.removesuffix('.png')}"  # the pair's own file
    # The subset's metadata rows are the root's rows, as written there.
    original = {line.split(",")[1]: line for line in (root / "metadata.csv").read_text().splitlines()[1:]}
    assert [",".join(r) for r in rows] == [original[s] for s in chosen]


def test_subset_folder_is_seeded_and_min_per_group_raises_small_strata(tmp_path):
    root = tmp_path / "data"
    make_dataset(root)
    first = [r[1] for r in picked(subset_folder(root, 6, tmp_path / "a"))]
    again = [r[1] for r in picked(subset_folder(root, 6, tmp_path / "b"))]
    other = [r[1] for r in picked(subset_folder(root, 6, tmp_path / "c", seed=1))]
    assert first == again
    assert first != other
    # round(6 * 6 / 24) = 2 per small stratum; min_per_group=4 keeps 4 of each (the cv rule keeps 6: all).
    counts = {}
    for minimum in (2, 4, 6):
        rows = picked(subset_folder(root, 6, tmp_path / f"m{minimum}", min_per_group=minimum))
        counts[minimum] = [sum(r[5] == a for r in rows) for a in STRATA]
    assert counts == {2: [3, 2, 2], 4: [4, 4, 4], 6: [6, 6, 6]}


def test_subset_folder_matches_the_pandas_rule_the_copies_used(tmp_path):
    """The rule each old copy ran (pandas groupby, one rng, to_csv), byte for byte, so subsets
    behind results already on disk come out the same."""
    pd = pytest.importorskip("pandas")
    root = tmp_path / "data"
    make_dataset(root, {"b": 7, "a": 11, "c": 3})
    with open(root / "metadata.csv", "a") as handle:  # a case of no appearance: groupby leaves it out
        handle.write("train,none000,64,64,0.5,\n")
    for sub in ("train_images", "train_masks"):
        (root / sub / "none000.png").write_text(sub)
    for n, minimum in ((5, 2), (9, 4), (14, 6), (21, 2)):
        meta = pd.read_csv(root / "metadata.csv")
        rng = np.random.default_rng(0)
        parts = []
        for _, group in meta.groupby("appearance"):
            keep = max(minimum, round(n * len(group) / len(meta)))
            parts.append(group.iloc[rng.permutation(len(group))[:keep]])
        expected = tmp_path / f"expected-{n}.csv"
        pd.concat(parts).to_csv(expected, index=False)
        target = subset_folder(root, n, tmp_path / f"work-{minimum}", min_per_group=minimum)
        assert (target / "metadata.csv").read_bytes() == expected.read_bytes(), (n, minimum)


def test_subset_folder_without_n_is_the_dataset_itself(tmp_path):
    root = tmp_path / "data"
    make_dataset(root)
    for n in (None, 0):
        assert subset_folder(root, n, tmp_path / "work") == root
    assert not (tmp_path / "work").exists()


def test_subset_folder_refuses_more_cases_than_the_dataset_has(tmp_path):
    root = tmp_path / "data"
    make_dataset(root)
    with pytest.raises(SegxError, match=r"a subset of 25 cases asked of .*data, which has 24; ask for 1 to 24"):
        subset_folder(root, 25, tmp_path / "work")
    assert not (tmp_path / "work").exists()


def test_subset_folder_names_a_case_whose_mask_is_missing(tmp_path):
    root = tmp_path / "data"
    make_dataset(root, {"only": 4})
    (root / "train_masks" / "onl002.png").unlink()
    with pytest.raises(SegxError, match=r"case 'onl002' .* has no train_masks file"):
        subset_folder(root, 4, tmp_path / "work")
    (root / "metadata.csv").unlink()
    with pytest.raises(SegxError, match=r"metadata.csv is missing"):
        subset_folder(root, 4, tmp_path / "work")


# --- spread ----------------------------------------------------------------------------------
def test_spread_text_for_known_values():
    assert spread([3.0, 1.0, 2.0]) == "2.00 (1.00-3.00)"
    assert spread([4, 1, 2, 3], 1) == "2.5 (1.0-4.0)"  # an even count: the mean of the middle two
    assert spread(np.array([0.5, 0.25, 0.125]), 3) == "0.250 (0.125-0.500)"
    assert spread([0.0123456, 1234.5, 7.0], 3, style="g") == "7 (0.0123-1.23e+03)"
    assert spread([12.6], 0) == "13 (13-13)"
    assert spread([], 1, empty="-") == "-"
    with pytest.raises(ValueError, match="no values"):
        spread([])


# --- machine ---------------------------------------------------------------------------------
def test_machine_gives_the_keys_the_reports_read():
    info = machine()
    assert info["cores"] == os.cpu_count()
    assert info["python"] == platform.python_version()
    assert isinstance(info["cpu"], str) and info["cpu"]
    assert info["memory_gib"] is None or info["memory_gib"] > 0
    assert list(info) == ["cpu", "cores", "memory_gib", "python"]  # what peer.py's report reads, and memory


def test_the_study_machine_adds_the_versions_its_report_reads():
    from segx.benchmark.study import machine as study_machine

    info = study_machine()
    for key in ("cpu", "cores", "python", "tensorflow", "tf-keras", "segmentation-models", "numpy", "segx"):
        assert key in info, key
    assert info["numpy"] == metadata.version("numpy")
    assert info["cpu"] == machine()["cpu"]


# --- results ---------------------------------------------------------------------------------
def test_write_results_round_trips_and_writes_the_report_beside_it(tmp_path):
    folder = tmp_path / "deep" / "out"
    payload = {"args": {"rounds": 3}, "seconds": [np.float32(0.5), 1.25], "count": np.int64(7)}
    seen = {}

    def report(saved: dict) -> str:
        seen.update(saved)
        return f"# {saved['args']['rounds']} rounds, updated {saved['updated']}\n"

    path = write_results(folder, payload, report, stamp="updated")
    assert path == folder / "results.json"
    back = read_results(folder)
    assert back["args"] == {"rounds": 3}
    assert back["seconds"] == [0.5, 1.25]
    assert back["count"] == 7.0  # numpy numbers go through float, as the study always wrote them
    assert back["updated"] == seen["updated"]
    assert (folder / "RESULTS.md").read_text() == f"# 3 rounds, updated {back['updated']}\n"
    assert path.read_text().startswith('{\n "args"')  # indent=1, as the scripts wrote
    assert sorted(p.name for p in folder.iterdir()) == ["RESULTS.md", "results.json"]  # no .tmp left


def test_write_results_names_indent_and_report_only(tmp_path):
    write_results(tmp_path, {"a": 1}, name="run.json", indent=2)
    assert (tmp_path / "run.json").read_text() == '{\n  "a": 1\n}'
    assert read_results(tmp_path, "run.json") == {"a": 1}
    write_results(tmp_path, report="text only")
    assert (tmp_path / "RESULTS.md").read_text() == "text only"
    assert not (tmp_path / "results.json").exists()
    assert read_results(tmp_path, required=False) == {}
    with pytest.raises(FileNotFoundError):
        read_results(tmp_path)


def test_write_results_replaces_the_file_whole(tmp_path):
    write_results(tmp_path, {"rows": list(range(1000))})
    write_results(tmp_path, {"rows": [1]})
    assert json.loads((tmp_path / "results.json").read_text()) == {"rows": [1]}


# --- the module itself ------------------------------------------------------------------------
def test_helpers_import_no_framework():
    code = (
        "import sys, segx.benchmark.helpers; "
        "print(sorted(m for m in ('tensorflow', 'keras', 'mlflow', 'hydra', 'omegaconf', 'pandas') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
