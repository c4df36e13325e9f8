"""The measures of experiments/compare/topk_hypothesis.py on distributions with a known answer."""

import pytest
import torch

from experiments.compare.topk_hypothesis import compare_distributions, verdict


def _peaked(order: list[int], V: int = 20) -> torch.Tensor:
    """Log-probs: 0.6 / 0.3 on the first two tokens of `order`, the rest a geometric tail, each < 0.01."""
    p = torch.zeros(V)
    p[order[0]], p[order[1]] = 0.6, 0.3
    tail = torch.tensor([0.95**i for i in range(V - 2)])
    p[torch.tensor(order[2:])] = 0.1 * tail / tail.sum()
    return p.log().unsqueeze(0)


def test_a_reshuffled_tail_lowers_topk_overlap_but_not_the_mass_measures():
    V, k = 20, 8
    head = [3, 7]
    rest = [i for i in range(V) if i not in head]
    lp = _peaked(head + rest)
    lq = _peaked(head + rest[::-1])  # same head, tail ranked the other way round
    m = {n: float(v[0]) for n, v in compare_distributions(lp, lq, k, floor=0.01, top_p=0.9).items()}
    assert m["topk_overlap"] < 0.9  # only the head is shared among the top 8
    assert m["floor_jaccard"] == 1.0 and m["nucleus_jaccard"] == 1.0
    assert m["nucleus_size"] == 2 < k and m["missed_mass"] < 0.05
    assert m["mass_overlap"] > 0.9 and m["topk_union_mass_overlap"] <= m["mass_overlap"] + 1e-6
    row = {**m, "nucleus_size_median": m["nucleus_size"]}
    assert verdict(row, k).startswith("explained")


def test_a_different_head_is_not_explained_by_the_tail():
    V, k = 20, 8
    lp = _peaked([3, 7] + [i for i in range(V) if i not in (3, 7)])
    lq = _peaked([5, 9] + [i for i in range(V) if i not in (5, 9)])
    m = {n: float(v[0]) for n, v in compare_distributions(lp, lq, k).items()}
    assert m["mass_overlap"] < 0.2 and m["nucleus_jaccard"] == 0.0
    assert verdict({**m, "nucleus_size_median": m["nucleus_size"]}, k) == "not explained"
    same = compare_distributions(lp, lp, k)
    assert float(same["topk_overlap"][0]) == 1.0 and float(same["mass_overlap"][0]) == pytest.approx(1.0)
