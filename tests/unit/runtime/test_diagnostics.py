import math

import pytest
import torch

from copd_core.readiness import DirectionDiagnostic, merge_readiness
from copd_runtime.maths.diagnostics import (
    bucketed_symmetric_kl_B_T,
    mass_overlap_B_T,
    symmetric_kl_B_T,
    topk_overlap_B_T,
)
from copd_runtime.recipes.opd import _first_occurrence


def test_topk_overlap_matches_set_reference():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(4, 6, 20, generator=g), torch.randn(4, 6, 20, generator=g)
    k = 5
    got = topk_overlap_B_T(s.topk(k, -1).indices, t.topk(k, -1).indices)
    for b in range(4):
        for i in range(6):
            a = set(s[b, i].topk(k).indices.tolist())
            c = set(t[b, i].topk(k).indices.tolist())
            assert got[b, i].item() == pytest.approx(len(a & c) / k)
    same = topk_overlap_B_T(s.topk(k, -1).indices, s.topk(k, -1).indices)
    assert torch.all(same == 1.0)


def _slow_skl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)) + sum(qi * math.log(qi / pi) for pi, qi in zip(p, q))


def test_symmetric_kl_matches_loop_reference():
    g = torch.Generator().manual_seed(2)
    lp = torch.log_softmax(torch.randn(2, 3, 7, generator=g), -1)
    lq = torch.log_softmax(torch.randn(2, 3, 7, generator=g), -1)
    got = symmetric_kl_B_T(lp, lq)
    for b in range(2):
        for t in range(3):
            ref = _slow_skl(lp[b, t].exp().tolist(), lq[b, t].exp().tolist())
            assert got[b, t].item() == pytest.approx(ref, rel=1e-5)
    assert torch.allclose(symmetric_kl_B_T(lp, lp), torch.zeros(2, 3), atol=1e-6)


def _bucketed(lp, lq, k):
    support = torch.cat([lp.topk(k, -1).indices, lq.topk(k, -1).indices], -1)
    return bucketed_symmetric_kl_B_T(lp.gather(-1, support), lq.gather(-1, support), _first_occurrence(support))


def test_bucketed_kl_is_exact_when_support_covers_vocab_and_a_lower_bound_otherwise():
    g = torch.Generator().manual_seed(3)
    lp = torch.log_softmax(torch.randn(3, 4, 12, generator=g) * 2, -1)
    lq = torch.log_softmax(torch.randn(3, 4, 12, generator=g) * 2, -1)
    exact = symmetric_kl_B_T(lp, lq)
    assert torch.allclose(_bucketed(lp, lq, 12), exact, atol=1e-4)
    for k in (1, 3, 6):
        assert torch.all(_bucketed(lp, lq, k) <= exact + 1e-5)


def test_mass_overlap_is_one_minus_total_variation_on_the_whole_vocab_and_a_lower_bound_on_a_union():
    g = torch.Generator().manual_seed(4)
    lp = torch.log_softmax(torch.randn(3, 4, 12, generator=g) * 2, -1)
    lq = torch.log_softmax(torch.randn(3, 4, 12, generator=g) * 2, -1)
    full = torch.arange(12).expand(3, 4, 12)
    tv = 0.5 * (lp.exp() - lq.exp()).abs().sum(-1)
    exact = mass_overlap_B_T(lp, lq, torch.ones(3, 4, 12, dtype=torch.bool))
    assert torch.allclose(exact, 1 - tv, atol=1e-5)
    assert torch.allclose(mass_overlap_B_T(lp, lp, _first_occurrence(full)), torch.ones(3, 4), atol=1e-5)
    for k in (1, 3, 6):
        support = torch.cat([lp.topk(k, -1).indices, lq.topk(k, -1).indices], -1)
        got = mass_overlap_B_T(lp.gather(-1, support), lq.gather(-1, support), _first_occurrence(support))
        assert torch.all(got <= exact + 1e-6) and torch.all(got >= 0)


def test_first_occurrence_marks_duplicates():
    ids = torch.tensor([[[3, 1, 3, 2, 1]]])
    assert _first_occurrence(ids).tolist() == [[[True, True, False, True, False]]]


def _d(cycle, s, t, ov, kl):
    return DirectionDiagnostic(cycle, s, t, ov, kl)


@pytest.mark.parametrize(
    "diags, cycle, want_ready, want_reason",
    [
        ([_d(2, "a", "b", 0.95, 0.1), _d(2, "b", "a", 0.93, 0.2)], 2, True, "AlignedForMerge"),
        ([_d(1, "a", "b", 0.95, 0.1)], 1, False, "BeforeMinCycles"),
        ([_d(2, "a", "b", 0.95, 0.1), _d(2, "b", "a", 0.80, 0.2)], 2, False, "TopKOverlapLow"),
        ([_d(2, "a", "b", 0.95, 0.1), _d(2, "b", "a", 0.95, 0.9)], 2, False, "SymmetricKLHigh"),
        ([_d(1, "a", "b", 0.95, 0.1)], 2, False, "NoDiagnostics"),
        ([_d(2, "a", "b", float("nan"), 0.1)], 2, False, "TopKOverlapLow"),
    ],
)
def test_merge_readiness(diags, cycle, want_ready, want_reason):
    ready, reason, message = merge_readiness(diags, cycle, min_cycles=2, min_topk_overlap=0.9, max_symmetric_kl=0.5)
    assert (ready, reason) == (want_ready, want_reason)
    assert message


def test_compact_report_fits_a_termination_message_and_keeps_what_readiness_needs():
    import json

    from copd_runtime.recipes.diagnose import compact_report

    names = [f"branch-{i:02d}" for i in range(32)]
    rows = [_d(5, s, t, 0.95 - 0.001 * i - 0.0001 * j, 0.1 + 0.01 * i + 0.001 * j)
            for i, s in enumerate(names) for j, t in enumerate(names) if s != t]
    small = compact_report(5, rows[:6])
    assert small["total"] == 6 and len(small["directions"]) == 6 and "partial" not in small
    big = compact_report(5, rows)
    assert big["partial"] and big["total"] == 32 * 31
    assert len(json.dumps(big)) < 4096
    kept = [DirectionDiagnostic(5, s, t, o, k) for s, t, o, k in big["directions"]]
    full = merge_readiness(rows, 5, 1, 0.9, 0.5)
    assert merge_readiness(kept, 5, 1, 0.9, 0.5)[:2] == full[:2]
    assert min(d.topk_overlap for d in kept) == pytest.approx(min(d.topk_overlap for d in rows), abs=1e-4)
    assert max(d.symmetric_kl for d in kept) == pytest.approx(max(d.symmetric_kl for d in rows), abs=1e-4)


@pytest.mark.parametrize("k", [2, 3, 4, 6])
def test_diagnose_visits_every_direction_with_the_fewest_policy_loads(k):
    """Two policies in memory: every direction once, and one load per pair of branches after the first
    two (both directions of a pair while both are loaded; the next pair keeps one of them)."""
    from copd_runtime.recipes.diagnose import loads, visiting_order

    names = [f"b{i}" for i in range(k)]
    spec_order = [(a, b) for a in names for b in names if a != b]
    order = visiting_order(spec_order)
    assert sorted(order) == sorted(spec_order)
    assert loads(order) == 1 + k * (k - 1) // 2 < loads(spec_order) or k == 2
