"""Online mining on hand-built embeddings: which triplets are valid, semi-hard, hardest."""

import itertools

import numpy as np
import pytest

from siamese_core.mining import (
    batch_all_loss,
    batch_hard_loss,
    mean_pair_distances,
    semihard_loss,
)

# Points on a line: class 0 at 0 and 1, class 1 at 1.5 and 4. Squared distances:
# d(0,1)=1, d(0,1.5)=2.25, d(0,4)=16, d(1,1.5)=0.25, d(1,4)=9, d(1.5,4)=6.25
LABELS = np.array([0, 0, 1, 1])
POINTS = np.array([[0.0], [1.0], [1.5], [4.0]], dtype=np.float32)
MARGIN = 0.5


def _brute_force_triplets():
    d = ((POINTS[:, None, :] - POINTS[None, :, :]) ** 2).sum(-1)
    for a, p, n in itertools.permutations(range(4), 3):
        if LABELS[a] == LABELS[p] and LABELS[a] != LABELS[n]:
            yield a, p, n, d[a, p] - d[a, n] + MARGIN, d


def test_batch_all_averages_the_positive_losses_of_valid_triplets():
    positive = [loss for *_, loss, _ in _brute_force_triplets() if loss > 0]
    assert float(batch_all_loss(LABELS, POINTS, MARGIN)) == pytest.approx(np.mean(positive))


def test_batch_hard_uses_the_farthest_positive_and_nearest_negative():
    # anchors: 0 -> pos 1, neg 2.25: 1-2.25+.5 < 0 -> 0; 1 -> pos 1, neg .25: 1.25;
    # 2 (1.5) -> pos 6.25, neg .25: 6.5; 3 (4) -> pos 6.25, neg 9: 0
    assert float(batch_hard_loss(LABELS, POINTS, MARGIN)) == pytest.approx((0 + 1.25 + 6.5 + 0) / 4)


def test_semihard_takes_the_nearest_negative_beyond_the_positive_else_the_farthest():
    # (0,1): d=1, negatives 2.25, 16 beyond -> 2.25: loss max(1-2.25+.5,0)=0
    # (1,0): d=1, negatives .25, 9 -> beyond: 9 -> 0
    # (2,3): d=6.25, negatives 2.25, .25 -> none beyond -> farthest 2.25: 6.25-2.25+.5=4.5
    # (3,2): d=6.25, negatives 16, 9 -> beyond: 9 -> 0
    assert float(semihard_loss(LABELS, POINTS, MARGIN)) == pytest.approx(4.5 / 4)


def test_well_separated_classes_give_zero_loss():
    points = np.array([[0.0], [0.1], [10.0], [10.1]], dtype=np.float32)
    for loss in (batch_all_loss, batch_hard_loss, semihard_loss):
        assert float(loss(LABELS, points, MARGIN)) == 0.0


def test_mean_pair_distances_signal_a_collapse():
    pos, neg = mean_pair_distances(LABELS, POINTS)
    assert float(pos) == pytest.approx((1 + 6.25) / 2)
    assert float(neg) == pytest.approx((2.25 + 16 + 0.25 + 9) / 4)
    collapsed = np.zeros((4, 3), np.float32)
    assert [float(x) for x in mean_pair_distances(LABELS, collapsed)] == [0.0, 0.0]
