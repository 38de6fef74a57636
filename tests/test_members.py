"""check_compatible: every way two members can disagree is refused in one line naming both runs
(the fingerprint branch is covered with real trainings in test_fingerprint.py)."""

from __future__ import annotations

import pytest

from segx.ensembling.members import check_compatible
from segx.errors import SegxError
from tests.helpers import cached, member


def test_members_that_agree_pass_and_different_predictions_are_fine():
    check_compatible([member("r1", seed=0), member("r2", seed=5)])  # other probabilities, same truth


@pytest.mark.parametrize(
    "other,message",
    [
        (lambda: member("r1"), r"member run 'r1' is listed twice"),
        (lambda: member("r2", val=cached(("a", "b", "d"))), r"members r1 and r2 have different validation cases"),
        (lambda: member("r2", val=cached(size=16)), r"members r1 and r2 cached validation maps of different sizes"),
        (lambda: member("r2", test=cached(("t1", "t3"))), r"members r1 and r2 have different test cases"),
        (lambda: member("r2", test=None), r"members r1 and r2 have different test cases"),
    ],
)
def test_each_disagreement_is_refused_naming_both_runs(other, message):
    with pytest.raises(SegxError, match=message) as info:
        check_compatible([member("r1"), other()])
    assert "\n" not in str(info.value)


def test_same_cases_with_other_ground_truth_are_refused():
    flipped = cached()
    flipped.masks.flat[:] = ~flipped.masks.flat
    with pytest.raises(SegxError, match=r"members r1 and r2 disagree on validation ground truth"):
        check_compatible([member("r1"), member("r2", val=flipped)])


def test_no_members_is_refused():
    with pytest.raises(SegxError, match="the ensemble has no members"):
        check_compatible([])


def test_members_sharing_backbone_and_arch_get_distinct_row_names():
    from segx.ensembling.members import unique_labels

    a = member("r1", view={"mode": "resize", "size": 96})
    b = member("r2", view={"mode": "patch", "size": 96})
    c = member("r3", view={"mode": "patch", "size": 96})
    assert unique_labels([a, b]) == ["resnet18-unet-resize96", "resnet18-unet-patch96"]
    assert unique_labels([a, b, c]) == [
        "resnet18-unet-resize96",
        "resnet18-unet-patch96-r2",
        "resnet18-unet-patch96-r3",
    ]
    assert unique_labels([a]) == ["resnet18-unet"]  # unchanged when nothing collides
