"""Triplet generation: random pairs, hard and semi-hard negatives on hand-built embeddings."""

import numpy as np
import pytest

from siamese_core.data import ImageFolder
from siamese_core.triplets import (
    generate_triplets,
    load_triplets,
    pick_negatives,
    save_triplets,
)


def _folder(counts):
    labels = np.repeat(np.arange(len(counts)), counts)
    paths = [f"/data/c{label}/{i}.png" for i, label in enumerate(labels)]
    return ImageFolder("/data", paths, labels, [f"c{i}" for i in range(len(counts))])


def test_random_uses_every_pair_once_with_a_negative_of_another_class():
    table = generate_triplets(_folder([4, 3, 1]), "random", seed=1)
    assert len(table) == 6 + 3  # C(4,2) + C(3,2); the single-image class gives no pair
    assert (table["anchor_class"] != table["negative_class"]).all()
    assert not table.duplicated(["anchor", "positive"]).any()
    assert (table["anchor"].str.split("/").str[2] == table["positive"].str.split("/").str[2]).all()


def test_random_is_seeded_and_capped():
    folder = _folder([10, 10, 10])
    first = generate_triplets(folder, "random", max_pairs_per_class=7, seed=3)
    assert len(first) == 21
    assert first.equals(generate_triplets(folder, "random", max_pairs_per_class=7, seed=3))
    assert not first.equals(generate_triplets(folder, "random", max_pairs_per_class=7, seed=4))


def test_pick_negatives_by_rule():
    ap = np.array([1.0, 1.0])
    an = np.array([[0.5, 1.2, 3.0, 1.9], [5.0, 4.0, 0.2, 9.0]])
    # hard: |d(A,N) - d(A,P)| smallest
    assert pick_negatives(ap, an, "hard", margin=0.5).tolist() == [1, 2]
    # semihard: 1 < d < 1.5 -> column 1 for row 0; row 1 has none -> hardest (column 2)
    assert pick_negatives(ap, an, "semihard", margin=0.5).tolist() == [1, 2]
    # with a wider band, the nearest negative inside it is chosen
    assert pick_negatives(ap, an, "semihard", margin=5.0).tolist() == [1, 1]


def test_mined_negatives_come_from_the_embeddings():
    folder = _folder([2, 1, 1])
    # class 0 at the origin, one negative very close (class 1), one far (class 2)
    embeddings = np.array([[0.0, 0.0], [1.0, 0.0], [1.1, 0.0], [10.0, 0.0]], dtype=np.float32)
    hard = generate_triplets(folder, "hard", embeddings=embeddings)
    assert hard["negative"].tolist() == ["/data/c1/2.png"]
    semihard = generate_triplets(folder, "semihard", embeddings=embeddings, margin=0.5)
    assert semihard["negative"].tolist() == ["/data/c1/2.png"]  # 1.0 < 1.21 < 1.5
    with pytest.raises(ValueError, match="one embedding per image"):
        generate_triplets(folder, "hard")


def test_table_round_trips_through_csv(tmp_path):
    table = generate_triplets(_folder([3, 3]), "random", seed=0)
    path = save_triplets(table, tmp_path / "triplets.csv")
    assert load_triplets(path).equals(table)
    assert [p.name for p in tmp_path.iterdir()] == ["triplets.csv"]  # no temporary file left
