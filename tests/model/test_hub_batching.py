"""The batched hub: concurrent requests are coalesced into one forward and get the scores
one-by-one scoring gives (real tiny Qwen3, threads and real HTTP clients)."""

import threading

import torch

from copd_runtime.data.datasets import text_examples
from copd_runtime.hub import BatchingScorer, HttpHub, InProcessHub, make_server
from copd_runtime.models.policy import load_policy
from copd_runtime.rollout import sample


def _rollouts(tiny_dirs, n: int):
    pol = load_policy(tiny_dirs["a"])
    out = []
    for i, domain in enumerate(["arith", "reverse", "maxbox", "arith", "reverse", "maxbox"][:n]):
        torch.manual_seed(i)
        # different rows, prompt lengths and response lengths: the requests pad to different L
        out.append(sample(pol, text_examples(domain, 2 + i % 3, i), 4 + 2 * i, temperature=1.0, logprobs=False))
    return out


def _assert_same(got: dict, want: dict):
    assert set(got) == set(want)
    for key in want:
        assert got[key].shape == want[key].shape, key
        if key == "topk_ids":
            m = want["topk_logprobs"] != 0
            assert torch.equal(got[key][m], want[key][m])
        else:
            assert torch.allclose(got[key], want[key], atol=1e-5), (key, (got[key] - want[key]).abs().max())


def test_concurrent_requests_are_one_forward_with_the_one_by_one_scores(tiny_dirs):
    hub = InProcessHub({"b": tiny_dirs["b"]}, temperature=0.8)
    rollouts = _rollouts(tiny_dirs, 6)
    queries = [torch.randint(0, 60, r.input_ids.shape + (3,), generator=torch.Generator().manual_seed(i))
               for i, r in enumerate(rollouts)]
    want = [hub.score("b", r, 4, q) for r, q in zip(rollouts, queries)]

    scorer = BatchingScorer(hub, start=False)
    got: list = [None] * len(rollouts)

    def client(i):
        got[i] = scorer.score("b", rollouts[i], 4, queries[i])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(rollouts))]
    for t in threads:
        t.start()
    for _ in range(2000):  # all six are waiting before the worker starts: one batch
        if scorer.pending() == len(rollouts):
            break
        threading.Event().wait(0.01)
    assert scorer.pending() == len(rollouts)
    scorer.start()
    for t in threads:
        t.join(timeout=120)
    assert scorer.forwards == 1
    for g, w in zip(got, want):
        _assert_same(g, w)
    scorer.close()


def test_the_token_budget_splits_batches_and_different_k_never_share_one(tiny_dirs):
    hub = InProcessHub({"b": tiny_dirs["b"]}, temperature=1.0)
    rollouts = _rollouts(tiny_dirs, 4)
    budget = max(r.input_ids.numel() for r in rollouts) + 1  # room for about one request per forward
    scorer = BatchingScorer(hub, max_batch_tokens=budget, start=False)
    got: list = [None] * 4
    ks = [4, 4, 2, 4]
    threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, scorer.score("b", rollouts[i], ks[i])))
               for i in range(4)]
    for t in threads:
        t.start()
    while scorer.pending() < 4:
        threading.Event().wait(0.01)
    scorer.start()
    for t in threads:
        t.join(timeout=120)
    assert scorer.forwards >= 3
    for i in range(4):
        _assert_same(got[i], hub.score("b", rollouts[i], ks[i]))
    scorer.close()


def test_concurrent_http_clients_get_the_one_by_one_scores(tiny_dirs):
    hub = InProcessHub({"a": tiny_dirs["a"], "b": tiny_dirs["b"]}, temperature=1.0)
    server = make_server(hub, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        rollouts = _rollouts(tiny_dirs, 4)
        teachers = ["a", "b", "b", "a"]
        want = [hub.score(t, r, 3) for t, r in zip(teachers, rollouts)]
        got: list = [None] * 4

        def client(i):
            got[i] = HttpHub(url, wait_ready_s=30).score(teachers[i], rollouts[i], 3)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        for g, w in zip(got, want):
            _assert_same(g, w)
        assert server.scorer.forwards <= 4
    finally:
        server.shutdown()
        server.scorer.close()
