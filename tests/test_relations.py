import numpy as np
import pytest

from distributed_mtml.relations import _partitions, best_grouping, from_csv, to_csv


def _pairs_matrix(k=4, within=1.0, across=-0.2):
    a = np.full((k, k), across)
    for i in range(0, k, 2):
        a[i : i + 2, i : i + 2] = within
    return a


def test_partitions_count_is_stirling():
    assert sum(1 for _ in _partitions(list(range(5)), 2)) == 15
    assert sum(1 for _ in _partitions(list(range(6)), 3)) == 90


def test_grouping_recovers_pairs_on_a_hand_made_matrix():
    groups, score = best_grouping(_pairs_matrix(), 2)
    assert groups == [(0, 1), (2, 3)] and score == pytest.approx(1.0)


def test_grouping_avoids_singletons_and_follows_asymmetric_affinity():
    a = np.array([[0, 0.9, 0.1], [0.8, 0, 0.0], [0.0, 0.2, 0]])  # 0 and 1 help each other
    groups, _ = best_grouping(a, 1)
    assert groups == [(0, 1, 2)]
    groups, _ = best_grouping(np.pad(a, ((0, 1), (0, 1)), constant_values=0.5), 2)
    assert (0, 1) in groups


def test_greedy_beyond_the_exhaustive_limit_finds_planted_blocks():
    groups, _ = best_grouping(_pairs_matrix(k=14), 7)
    assert groups == [(i, i + 1) for i in range(0, 14, 2)]


def test_csv_round_trip():
    a = np.arange(9.0).reshape(3, 3)
    values, order = from_csv(to_csv(a, ["x", "y", "z"]))
    assert order == ["x", "y", "z"] and np.array_equal(values, a)
