"""The runtime on a tiny Qwen3-VL: image (color) and video (motion) prompts through
sampling, log-prob recomputation, GRPO, OPD with a hub teacher, and the hub wire format."""

import math
import random
import shutil
import threading
from dataclasses import replace

import pytest
import torch

from copd_core.spec import DatasetSpec, DiagnosticsSpec, OPDSpec, RLSpec
from copd_runtime.builtin.tiny_vlm import build_tiny_qwen3_vl, single_thread
from copd_runtime.data.datasets import load_dataset, text_examples
from copd_runtime.data.media import vision_examples
from copd_runtime.hub import (
    HttpHub,
    HubRefused,
    InProcessHub,
    decode_request,
    encode_request,
    load_media,
    make_server,
)
from copd_runtime.models.policy import Policy, load_policy, save_policy
from copd_runtime.models.vlm import mm_token_type_ids, vision_token_ids
from copd_runtime.recipes.grpo import grpo_step
from copd_runtime.recipes.opd import opd_step
from copd_runtime.rollout import (
    Rollout,
    encode_prompts,
    forward_logits,
    response_logprobs,
    sample,
    teacher_scores,
)
from tests.model.helpers import SamplerLogits


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with single_thread():  # a tiny model on a shared CPU: 1 thread is several times faster
        yield


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    return tmp_path_factory.mktemp("vlm")


@pytest.fixture(scope="module")
def base_dir(storage):
    """A briefly warm-started tiny Qwen3-VL (so that rewards vary within a group), saved once."""
    policy = build_tiny_qwen3_vl(seed=0, warm_steps=60, media_dir=storage / "warm-media")
    path = storage / "base"
    save_policy(policy, path)
    return path


@pytest.fixture()
def policy(base_dir) -> Policy:
    return load_policy(base_dir)


@pytest.fixture(scope="module")
def datasets(storage):
    return {d: load_dataset(d, DatasetSpec(builtin=d, size=32), None, storage, seed=0, eval_size=8)
            for d in ("color", "motion")}


def _params(policy):
    return [p.detach().clone() for p in policy.model.parameters()]


def _changed(before, policy) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(before, policy.model.parameters()))


def _mixed(datasets, n=3):
    return datasets["color"].train[:n] + datasets["motion"].train[:n]


# ---------------------------------------------------------------------------


def test_domains_are_deterministic_and_media_written_once(storage):
    a = vision_examples("motion", 6, 5, storage / "det")
    mtimes = {p: (storage / "det" / p).stat().st_mtime_ns for p in (x.split("/")[-1] for e in a for x in e.video)}
    b = vision_examples("motion", 6, 5, storage / "det")
    assert a == b
    assert all(len(e.video) == 4 and not e.images for e in a)
    assert {p: (storage / "det" / p).stat().st_mtime_ns for p in mtimes} == mtimes
    c = vision_examples("color", 40, 5, storage / "det")
    assert {e.answer for e in c} == {"red", "green", "blue", "yellow"}
    assert all(len(e.images) == 1 and "<|image_pad|>" in e.prompt for e in c)


def test_prompt_encoding_left_pads_and_packs_vision(policy, datasets):
    ex = _mixed(datasets, 2)
    enc = encode_prompts(policy, ex)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert ids.shape == mask.shape and ids.shape[0] == 4
    assert (mask[:, -1] == 1).all()  # left padding
    assert (mask[:, 0] == 0).any()  # the shorter image prompts are padded
    cfg = policy.model.config
    # one grid row per image / per video; placeholders = patches / merge²
    assert enc["image_grid_thw"].shape == (2, 3) and enc["video_grid_thw"].shape == (2, 3)
    assert enc["pixel_values"].shape[0] == int(enc["image_grid_thw"].prod(-1).sum())
    assert enc["pixel_values_videos"].shape[0] == int(enc["video_grid_thw"].prod(-1).sum())
    assert int((ids == cfg.image_token_id).sum()) == int(enc["image_grid_thw"].prod(-1).sum()) // 4
    assert int((ids == cfg.video_token_id).sum()) == int(enc["video_grid_thw"].prod(-1).sum()) // 4
    assert int(enc["video_grid_thw"][0, 0]) == 2  # 4 frames / temporal patch 2
    # our token types are the processor's own
    raw = policy.processor(text=[e.prompt for e in ex[:2]], images=[e.images[0] for e in ex[:2]],
                           padding=True, padding_side="left", return_tensors="pt")
    assert torch.equal(mm_token_type_ids(cfg, raw["input_ids"]), raw["mm_token_type_ids"])


def test_behaviour_logprobs_match_recomputation_on_images_and_video(policy, datasets):
    torch.manual_seed(0)
    ex = [e for e in _mixed(datasets, 4) for _ in range(2)]
    with SamplerLogits(policy) as sampler:
        r = sample(policy, ex, max_new_tokens=8, temperature=1.0)
    m = r.response_mask.bool()
    # the batch exercises left-padded prompts AND right-padded (finished) responses
    assert (~r.truncated).any()
    assert (r.attention_mask[:, -1] == 0).any()
    # no vision special token is ever sampled
    specials = torch.tensor(list(vision_token_ids(policy.model.config).values()))
    assert not torch.isin(r.input_ids[m], specials).any()
    with torch.no_grad():
        lp = response_logprobs(policy, r, 1.0)
    assert torch.equal(lp, r.old_logprobs)
    # π_old (the trainer's forward) is the distribution generate() sampled from
    assert (sampler.behaviour_logprobs(r, 1.0) - r.old_logprobs)[m].abs().max().item() < 1e-4
    assert (r.old_logprobs[m] < 0).all()

    # a mini-batch split (mixed image/video rows) gives the same per-row log-probs
    rows = [1, 5, 6, 14]
    sub = r.select(rows)
    assert sub.vision["pixel_values"].shape[0] == int(sub.vision["image_grid_thw"].prod(-1).sum())
    assert sub.vision["pixel_values_videos"].shape[0] == int(sub.vision["video_grid_thw"].prod(-1).sum())
    assert sub.vision["image_grid_thw"].shape[0] == sum(len(e.images) for e in sub.examples)
    assert set(r.select([0, 2]).vision) == {"pixel_values", "image_grid_thw"}  # no empty video tensors
    with torch.no_grad():
        lp_sub = response_logprobs(policy, sub, 1.0)
    assert (lp_sub - lp[rows])[sub.response_mask.bool()].abs().max().item() < 1e-4

    # a text-only batch (no grids: 1-D positions) and a batch mixing text, image and video rows
    text = text_examples("arith", 4, 0)
    for batch in (text, text[:2] + _mixed(datasets, 1)):
        with SamplerLogits(policy) as sampler:
            rt = sample(policy, batch, max_new_tokens=6, temperature=1.0)
        assert (sampler.behaviour_logprobs(rt, 1.0) - rt.old_logprobs)[rt.response_mask.bool()].abs().max() < 1e-4

    # the check can fail: plain 1-D positions (no M-RoPE index) give other log-probs
    with torch.no_grad():
        pos = (r.attention_mask.cumsum(-1) - 1).clamp(min=0)
        wrong = policy.model(input_ids=r.input_ids, attention_mask=r.attention_mask, position_ids=pos,
                             use_cache=False, **r.vision).logits
        wrong_lp = torch.log_softmax(wrong[:, :-1], -1).gather(-1, r.input_ids[:, 1:, None])[..., 0]
    assert (torch.nn.functional.pad(wrong_lp, (1, 0)) - lp)[m].abs().max().item() > 1e-3


@pytest.mark.parametrize("domain, micro", [("color", {}), ("motion", {}),
                                           ("color", {"micro_batch_tokens": 64, "gradient_checkpointing": True})])
def test_grpo_step_with_minibatches(policy, datasets, domain, micro):
    torch.manual_seed(1)
    rl = RLSpec(group_size=8, batch_size=4, mini_batches=2, max_new_tokens=8, learning_rate=1e-3, **micro)
    opt = torch.optim.AdamW(policy.model.parameters(), lr=rl.learning_rate, weight_decay=0.0)
    before = _params(policy)
    stats = grpo_step(policy, opt, datasets[domain], rl, random.Random(0))
    assert all(math.isfinite(v) for v in stats.values()), stats
    assert 0.0 < stats["reward_mean"] < 1.0, stats  # some, not all, responses right: a real signal
    assert stats["tokens"] > 0
    assert _changed(before, policy)  # weight decay is 0: only a non-zero gradient moves them


def test_opd_step_with_hub_teacher_on_video(policy, datasets, storage):
    teacher_dir = storage / "teacher"
    if not teacher_dir.exists():
        save_policy(build_tiny_qwen3_vl(seed=1, warm_steps=0), teacher_dir)
    hub = InProcessHub({"motion": teacher_dir}, temperature=1.0)
    rl = RLSpec(group_size=2, batch_size=4, mini_batches=2, max_new_tokens=6, learning_rate=1e-3)
    opd = OPDSpec(beta=1.0, samples_per_prompt=2)
    opt = torch.optim.AdamW(policy.model.parameters(), lr=rl.learning_rate, weight_decay=0.0)
    before = _params(policy)
    torch.manual_seed(2)
    stats = opd_step(policy, opt, {"motion": datasets["motion"]}, hub, 1.0, rl, opd, DiagnosticsSpec(top_k=8),
                     random.Random(0))
    assert all(math.isfinite(v) for v in stats.values()), stats
    assert 0.0 <= stats["topk_overlap/motion"] <= 1.0
    assert stats["topk_union_symmetric_kl/motion"] > 0.0  # a different random model is not the student
    assert stats["advantage_mean"] != 0.0
    assert hub.requests == 1 and hub.tokens == stats["tokens"] > 0
    assert _changed(before, policy)


def test_opd_from_an_identical_vlm_teacher_gives_exactly_zero_advantage(policy, datasets, base_dir):
    """The teacher holds the student's weights: π_old and the teacher's scores come from
    the same code on the same rows, so every gap is exactly 0 (no tolerance) and no step is taken."""
    hub = InProcessHub({"color": base_dir, "motion": base_dir}, temperature=1.0)
    rl = RLSpec(group_size=2, batch_size=4, max_new_tokens=6, learning_rate=1e-3)
    opt = torch.optim.AdamW(policy.model.parameters(), lr=rl.learning_rate, weight_decay=0.0)
    before = _params(policy)
    torch.manual_seed(4)
    stats = opd_step(policy, opt, datasets, hub, 1.0, rl, OPDSpec(samples_per_prompt=2), DiagnosticsSpec(top_k=8),
                     random.Random(0))
    assert stats["tokens"] > 0 and stats["advantage_mean"] == 0.0 and stats["skipped"] == 1.0
    assert stats["topk_overlap/color"] == 1.0 and stats["topk_union_symmetric_kl/motion"] == 0.0
    assert not _changed(before, policy)


def test_wire_format_carries_media_paths_and_the_hub_rebuilds_the_pixels(policy, datasets, storage):
    """No pixels on the wire: the request names each row's media; the hub's processor turns them into
    exactly the vision tensors the trainer had, and the rows score as before, also after a row split."""
    torch.manual_seed(3)
    ex = datasets["motion"].train[:2] + datasets["color"].train[:3]
    r = sample(policy, ex, max_new_tokens=5, temperature=1.0)
    q = torch.randint(0, 10, (len(r), r.input_ids.shape[1], 4))
    blob = encode_request("motion", r, 4, q)
    teacher, back, k, q2 = decode_request(blob)
    assert (teacher, k) == ("motion", 4) and torch.equal(q, q2)
    for name in ("input_ids", "attention_mask", "response_mask"):
        assert torch.equal(getattr(back, name), getattr(r, name))
    assert back.vision == {} and b"pixel_values" not in blob
    assert [(e.images, e.video) for e in back.examples] == [(e.images, e.video) for e in ex]
    loaded = load_media(policy, back, [storage])
    assert set(loaded.vision) == set(r.vision) == {"pixel_values", "image_grid_thw", "pixel_values_videos",
                                                     "video_grid_thw"}
    for name, t in r.vision.items():
        assert torch.equal(loaded.vision[name], t) and loaded.vision[name].dtype == t.dtype, name
    got = teacher_scores(policy, loaded.select([0, 3]), 1.0, 4)
    want = teacher_scores(policy, r.select([0, 3]), 1.0, 4)
    for name in got:
        assert torch.equal(got[name], want[name]), name


@pytest.fixture()
def http_hub(base_dir, storage):
    """`copd hub`'s server over real HTTP: both VLM teachers, media allowed under the run's storage only."""
    hub = InProcessHub({"color": base_dir, "motion": base_dir}, temperature=1.0)
    server = make_server(hub, "127.0.0.1", 0, media_roots=[storage])
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield hub, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.scorer.close()


def test_http_hub_scores_vlm_rows_from_media_paths_as_from_pixels(policy, datasets, http_hub):
    """Two trainers' VLM rollouts (video; images) over HTTP, concurrently: the hub loads the media
    itself and returns what in-process scoring of the trainer's own pixel tensors returns."""
    hub, url = http_hub
    torch.manual_seed(5)
    rollouts = [sample(policy, datasets["motion"].train[:3], max_new_tokens=5, temperature=1.0),
                sample(policy, datasets["color"].train[:4], max_new_tokens=6, temperature=1.0)]
    teachers = ["motion", "color"]
    want = [hub.score(t, r, 4) for t, r in zip(teachers, rollouts)]
    got: list = [None, None]
    threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, HttpHub(url, wait_ready_s=30).score(
        teachers[i], rollouts[i], 4))) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    for g, w in zip(got, want):
        assert g is not None and set(g) == set(w)
        for name in w:
            assert torch.allclose(g[name], w[name], atol=1e-5), (name, (g[name] - w[name]).abs().max())


def test_http_hub_refuses_media_outside_its_roots(policy, datasets, http_hub, storage, tmp_path):
    """A path outside the run's storage (directly, through `..`, or through a symlink) is refused with a
    400 InvalidInput naming the row; the client does not retry it and nothing is scored."""
    hub, url = http_hub
    torch.manual_seed(6)
    inside = datasets["color"].train[0]
    r = sample(policy, [inside], max_new_tokens=4, temperature=1.0)
    outside = tmp_path / "elsewhere.png"
    shutil.copy(inside.images[0], outside)
    link = storage / "media" / "link-out.png"
    link.unlink(missing_ok=True)
    link.symlink_to(outside)
    sneaky = str(storage / "media" / ".." / ".." / outside.parent.name / outside.name)
    for path in (str(outside), str(link), sneaky, "/etc/hostname"):
        bad = Rollout([replace(inside, images=(path,))], r.input_ids, r.attention_mask, r.response_mask,
                      r.old_logprobs, r.truncated, r.responses, r.vision)
        before = hub.requests
        client = HttpHub(url, wait_ready_s=30, backoff_s=0.01)
        with pytest.raises(HubRefused) as err:
            client.score("color", bad, 4)
        assert err.value.code == 400 and err.value.reason == "InvalidInput", err.value
        assert "media[0].images[0]" in str(err.value) and "outside the hub's media roots" in str(err.value)
        assert client.retries == 0 and hub.requests == before
    # a path inside the roots that is not an image is refused too, with the loader's reason
    junk = storage / "media" / "not-an-image.png"
    junk.write_text("hello")
    bad = Rollout([replace(inside, images=(str(junk),))], r.input_ids, r.attention_mask, r.response_mask,
                  r.old_logprobs, r.truncated, r.responses, r.vision)
    with pytest.raises(HubRefused, match="cannot load the media") as err:
        HttpHub(url, wait_ready_s=30).score("color", bad, 4)
    assert err.value.reason == "InvalidInput"


def test_saved_vlm_reloads_identically(policy, tmp_path):
    save_policy(policy, tmp_path / "m")
    again = load_policy(tmp_path / "m")
    assert again.is_vlm and type(again.processor).__name__ == "Qwen3VLProcessor"
    ex = vision_examples("color", 1, 9, tmp_path / "media") + vision_examples("motion", 1, 9, tmp_path / "media")
    enc = encode_prompts(policy, ex)
    ids, mask = enc.pop("input_ids"), enc.pop("attention_mask")
    with torch.no_grad():
        a = forward_logits(policy, ids, mask, enc)
        b = forward_logits(again, ids, mask, enc)
    assert torch.equal(a, b)
