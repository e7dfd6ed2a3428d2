"""The data order: class balance, repeats and the held-out split, each a pure function of the seed."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from difffit.engine.data.batches import DataOrder, held_out, item_repeats, step_seed
from difffit.engine.errors import DiffFitError

LABELS = [0] * 30 + [1] * 6 + [2] * 3  # 30 : 6 : 3 images


def _class_counts(order: DataOrder, draws: int) -> Counter:
    return Counter(LABELS[i] for i in order.take(0, draws).tolist())


def test_default_order_is_a_plain_permutation_per_epoch():
    order = DataOrder(LABELS, seed=3)
    g = torch.Generator().manual_seed(step_seed(3, 1, 0x0D47A))  # epoch 1: one shuffle of the whole dataset
    assert torch.equal(order.take(len(LABELS), len(LABELS)), torch.randperm(len(LABELS), generator=g))
    assert _class_counts(order, 39 * 10) == {0: 300, 1: 60, 2: 30}


def test_class_balance_draws_classes_equally():
    order = DataOrder(LABELS, seed=0, balance=True)
    counts = _class_counts(order, 90 * 20)  # an epoch is 3 classes x 30 places
    assert counts == {0: 600, 1: 600, 2: 600}
    images = Counter(order.take(0, 90 * 20).tolist())
    assert set(images) == set(range(len(LABELS)))  # every image of the small classes is used, evenly
    assert {images[i] for i in range(36, 39)} == {200}
    again = DataOrder(LABELS, seed=0, balance=True)
    assert torch.equal(again.take(1234, 50), order.take(1234, 50))  # any position, any order of calls: resume


def test_repeats_per_class_and_global():
    names = ["a", "b", "c"]
    per_item = item_repeats({"c": 4}, LABELS, names)
    assert _class_counts(DataOrder(LABELS, 0, per_item), (30 + 6 + 12) * 5) == {0: 150, 1: 30, 2: 60}
    assert item_repeats(1, LABELS, names) is None
    assert item_repeats(2, LABELS, names) == [2] * len(LABELS)
    with pytest.raises(DiffFitError, match="zebra"):
        item_repeats({"zebra": 2}, LABELS, names)


def test_held_out_is_stratified_fixed_by_seed_and_keeps_a_training_image():
    chosen = held_out(LABELS, 0.2, seed=1)
    assert Counter(LABELS[i] for i in chosen) == {0: 6, 1: 1, 2: 1}
    assert chosen == held_out(LABELS, 0.2, seed=1) and chosen != held_out(LABELS, 0.2, seed=2)
    assert Counter(LABELS[i] for i in held_out(LABELS, 0.99, 0)) == {0: 29, 1: 5, 2: 2}
    assert held_out([0, 1], 0.5, 0) == []  # a class of one image keeps it for training


def test_recipe_repeats_table_reads_and_round_trips(tmp_path):
    import tomllib

    from difffit.engine.training.recipes import read_options, write_toml

    recipe = tmp_path / "r.toml"
    recipe.write_text('steps = 10\nclass_balance = true\n\n[repeats]\nrose = 3\n"sweet pea" = 2\n')
    options = read_options(recipe)
    assert options == {"steps": 10, "class_balance": True, "repeats": {"rose": 3, "sweet pea": 2}}
    assert tomllib.loads(write_toml(options)) == options  # the resolved config.toml reads back the same
    recipe.write_text('[repeats]\nrose = "many"\n')
    with pytest.raises(DiffFitError, match="rose"):
        read_options(recipe)
