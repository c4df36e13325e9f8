"""The memory bound of the chunked log-probs, accounted by the benchmark's own tracker
(bench/logprob_memory.py) on fake tensors: the Qwen3-sized problem, nothing allocated."""

import importlib.util

import pytest

from copd_runtime.maths.logprobs import CHUNK_BYTES
from tests import ROOT


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("logprob_memory", ROOT / "bench" / "logprob_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_chunked_logprobs_stay_within_the_benchmark_goal(bench):
    shape = (bench.SEQS, bench.TOKENS)
    naive = bench.tracked_peak_mb("naive", *shape, fake=True)
    chunked = bench.tracked_peak_mb("chunked", *shape, fake=True)
    assert naive > 3 * bench.SEQS * bench.TOKENS * bench.VOCAB * 4 / bench.MB * 0.9  # ~3 full [N, L, V] copies
    assert chunked <= 1.5 * 1024 and naive / chunked >= 8
    scoring = bench.tracked_peak_mb("chunked", *shape, fake=True, step=bench.score_step)
    assert scoring <= 2 * CHUNK_BYTES / bench.MB  # no gradient: about one [chunk, V] block


def test_the_tracker_agrees_on_real_and_fake_tensors(bench):
    for path in bench.PATHS:
        real = bench.tracked_peak_mb(path, 1, 64, fake=False)
        assert real == pytest.approx(bench.tracked_peak_mb(path, 1, 64, fake=True), abs=1e-9)
        assert real > 593  # the head's weight gradient (V·H·4 bytes) at least
