"""Attribute implications: the table holds in the data, and the mask marks exactly the implied changes."""

from __future__ import annotations

import pytest
import torch

from models.attributes import (
    CELEBA_ATTRIBUTES,
    IMPLIED_VALUES,
    STGAN_ATTRIBUTES,
    implication_text,
    implications_for,
    implied_changes,
)
from tests.conftest import SHARED

CELEBAHQ = SHARED / "datasets" / "celebahq-128"


def test_implied_values_name_celeba_attributes() -> None:
    for (a, v), implied in IMPLIED_VALUES.items():
        assert a in CELEBA_ATTRIBUTES and v in (0, 1)
        assert implied and a not in implied
        assert all(b in CELEBA_ATTRIBUTES and w in (0, 1) for b, w in implied.items())


@pytest.mark.skipif(not (CELEBAHQ / "list_attr_celeba.txt").is_file(), reason="needs ../shared/datasets")
def test_implied_values_hold_in_celebahq_train_labels() -> None:
    """Each implication holds for >= 98 % of the training faces with the implying value (and there are
    enough of them to say so): the table is the data's, not a guess."""
    from training.data import read_index

    index = read_index(CELEBAHQ)
    labels = torch.from_numpy(index.labels[index.split == 0]).long()
    col = {n: i for i, n in enumerate(index.attr_names)}
    for (a, v), implied in IMPLIED_VALUES.items():
        rows = labels[labels[:, col[a]] == v]
        assert len(rows) >= 300, (a, v, len(rows))
        for b, w in implied.items():
            share = (rows[:, col[b]] == w).float().mean().item()
            assert share >= 0.98, f"{a}={v} -> {b}={w} holds for {share:.3f} only"


def test_implied_changes_marks_only_what_the_edit_implies() -> None:
    names = list(STGAN_ATTRIBUTES)
    i = {n: k for k, n in enumerate(names)}
    woman = torch.zeros(len(names))
    woman[i["No_Beard"]] = 1
    woman[i["Young"]] = 1
    man_with_beard = torch.zeros(len(names))
    man_with_beard[i["Male"]] = 1
    c_src = torch.stack([woman, man_with_beard, man_with_beard, woman])
    c_trg = c_src.clone()
    c_trg[0, i["Mustache"]] = 1  # moustache on a woman: No_Beard and Male are implied
    c_trg[1, i["Mustache"]] = 1  # on a bearded man: No_Beard is 0 and Male 1 already, nothing implied
    c_trg[2, i["Male"]] = 0  # a bearded man made a woman: No_Beard -> 1
    c_trg[3, i["Bangs"]] = 1  # bangs on a woman with hair: Bald is 0 already
    mask = implied_changes(c_src, c_trg, names)
    expected = torch.zeros_like(mask)
    expected[0, i["No_Beard"]] = expected[0, i["Male"]] = 1
    expected[2, i["No_Beard"]] = 1
    assert torch.equal(mask, expected)
    # nothing moves, nothing is implied; and attributes outside ``names`` are skipped
    assert implied_changes(c_src, c_src, names).sum() == 0
    no_male = [n for n in names if n != "Male"]
    cols = [i[n] for n in no_male]
    only_beard = implied_changes(c_src[:, cols], c_trg[:, cols], no_male)
    assert only_beard[0, no_male.index("No_Beard")] == 1 and only_beard.sum() == 1


def test_implications_for_a_ui() -> None:
    table = implications_for(STGAN_ATTRIBUTES)
    assert table["Mustache"] == {"on": {"No_Beard": 0, "Male": 1}}
    assert table["No_Beard"] == {"on": {"Mustache": 0, "Goatee": 0}, "off": {"Male": 1}}
    assert "Eyeglasses" not in table and implication_text("Eyeglasses") is None
    text = implication_text("Mustache")
    assert text is not None and "+1 comes with Male, without No Beard" in text and "−1" not in text
