"""The bucketed loader: one bucket per batch, the image / video ratio, every sample of an epoch exactly once
over the DP ranks, worker prefetch, and a resume (on any DP size) that continues with exactly the next batch."""

import itertools

import numpy as np
import pytest
import torch

from megawan.data.loader import BatchPlan, BucketedLoader, split_even
from megawan.data.store import LatentStore, Sample

BUCKETS = {"5x16x16": 23, "5x16x32": 17, "1x16x16": 30, "1x32x16": 9}  # bucket -> samples


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("loader") / "s.zarr")
    store = LatentStore.create(path, vae={"name": "t"}, text_encoder={"name": "t"})
    writers = [store.writer(r) for r in range(2)]  # two precompute ranks: parts interleave
    for bucket, n in BUCKETS.items():
        f, h, w = (int(v) for v in bucket.split("x"))
        for i in range(n):
            latents = torch.full((4, (f - 1) // 4 + 1, h // 8, w // 8), float(i), dtype=torch.bfloat16)
            writers[i % 2].write(Sample(id=f"{bucket}/{i}", bucket=bucket, latents=latents,
                                        text=torch.full((6, 8), float(i)).to(torch.bfloat16), text_length=1 + i % 6))
    return path


def _take(loader, n):
    return list(itertools.islice(iter(loader), n))


def _real_ids(batch):
    return [i for i, w in zip(batch["ids"], batch["weight"].tolist()) if w > 0]


def test_batches_are_one_bucket_and_carry_latents_text_and_weights(store):
    loader = BucketedLoader(store, global_batch_size={"video": 4, "image": 8}, video_ratio=0.5, seed=1)
    for batch in _take(loader, 12):
        assert len({i.split("/")[0] for i in batch["ids"]}) == 1
        assert all(i.startswith(batch["bucket"] + "/") for i in batch["ids"])
        f, h, w = (int(v) for v in batch["bucket"].split("x"))
        assert batch["latents"].shape[1:] == (4, (f - 1) // 4 + 1, h // 8, w // 8)
        assert batch["latents"].dtype == torch.bfloat16 and batch["text"].shape[1:] == (6, 8)
        number = [int(i.split("/")[1]) for i in batch["ids"]]  # the values written were the sample numbers
        assert torch.equal(batch["latents"][:, 0, 0, 0, 0].float(), torch.tensor(number, dtype=torch.float))
        assert batch["text_length"].tolist() == [1 + k % 6 for k in number]


def test_video_ratio_holds_at_every_step():
    plan = BatchPlan({"5x16x16": 10, "1x16x16": 10}, {"5x16x16": 2, "1x16x16": 2}, video_ratio=0.25, seed=0)
    streams = [plan.stream_at(s) for s in range(400)]
    for end in range(4, 401, 4):
        assert streams[:end].count("video") == end // 4
    assert [BatchPlan({"5x16x16": 1}, {"5x16x16": 1}, 1.0, 0).stream_at(s) for s in range(3)] == ["video"] * 3


@pytest.mark.reliability
@pytest.mark.parametrize("dp_size", [1, 2, 3, 4])
def test_an_epoch_covers_every_sample_once_across_dp_ranks(store, dp_size):
    sizes = {"video": 5, "image": 7}
    loaders = [BucketedLoader(store, sizes, video_ratio=0.4, seed=3, dp_rank=r, dp_size=dp_size) for r in range(dp_size)]
    plan = loaders[0].plan
    steps = {s: 0 for s in ("video", "image")}
    n_batches = {s: len(plan.epoch_batches(s, 0)) for s in steps}
    seen = {"video": [], "image": []}
    per_rank = [iter(ld) for ld in loaders]
    while any(steps[s] < n_batches[s] for s in steps):
        batches = [next(it) for it in per_rank]
        stream, epoch = batches[0]["stream"], batches[0]["epoch"]
        assert {b["bucket"] for b in batches} == {batches[0]["bucket"]}  # all ranks: one bucket, one step
        assert len({b["latents"].shape for b in batches}) == 1  # same shape on every rank (padding, weight 0)
        if epoch == 0:
            steps[stream] += 1
            g = batches[0]["global_samples"]
            ids = [i for b in batches for i in _real_ids(b)]
            assert len(ids) == g <= sizes[stream]
            seen[stream] += ids
    for stream, buckets in (("video", ["5x16x16", "5x16x32"]), ("image", ["1x16x16", "1x32x16"])):
        expected = sorted(f"{b}/{i}" for b in buckets for i in range(BUCKETS[b]))
        assert sorted(seen[stream]) == expected  # nothing dropped, nothing repeated


def test_epochs_reshuffle_by_seed_and_epoch(store):
    plan = BucketedLoader(store, 4, seed=0).plan
    e0, e1 = plan.epoch_batches("video", 0), plan.epoch_batches("video", 1)
    assert [b for b, _ in e0] != [b for b, _ in e1] or any((x != y).any() for (_, x), (_, y) in zip(e0, e1))
    again = BucketedLoader(store, 4, seed=0).plan.epoch_batches("video", 0)
    assert all(a == c and np.array_equal(b, d) for (a, b), (c, d) in zip(e0, again))
    other = BucketedLoader(store, 4, seed=1).plan.epoch_batches("video", 0)
    assert any(not np.array_equal(b, d) for (_, b), (_, d) in zip(e0, other))


@pytest.mark.reliability
@pytest.mark.parametrize("resume_dp", [1, 2, 4])
def test_resume_continues_with_exactly_the_next_batch_on_any_dp_size(store, resume_dp):
    kwargs = dict(global_batch_size={"video": 4, "image": 6}, video_ratio=0.5, seed=5, num_workers=3)
    # the uninterrupted run (2 DP ranks): 40 steps, longer than an epoch of either stream
    full = [_take(BucketedLoader(store, dp_rank=r, dp_size=2, **kwargs), 40) for r in range(2)]
    # stop after 13 steps (prefetched batches beyond it are discarded with the process), save, resume
    first = BucketedLoader(store, dp_rank=0, dp_size=2, **kwargs)
    it = iter(first)
    for _ in range(13):
        next(it)
    state = first.state_dict()
    assert state["step"] == 13
    resumed = [BucketedLoader(store, dp_rank=r, dp_size=resume_dp, **kwargs) for r in range(resume_dp)]
    for ld in resumed:
        ld.load_state_dict(state)
    after = [_take(ld, 27) for ld in resumed]
    for step in range(27):
        want = [i for r in range(2) for i in _real_ids(full[r][13 + step])]
        got = [i for r in range(resume_dp) for i in _real_ids(after[r][step])]
        assert got == want, step
        ref = torch.cat([full[r][13 + step]["latents"][full[r][13 + step]["weight"] > 0] for r in range(2)])
        out = torch.cat([after[r][step]["latents"][after[r][step]["weight"] > 0] for r in range(resume_dp)])
        assert torch.equal(ref, out)


def test_bad_settings_are_refused(store):
    with pytest.raises(ValueError, match="not in the store"):
        BucketedLoader(store, 4, buckets=["81x480x832"])
    with pytest.raises(ValueError, match="no non-empty image bucket"):
        BucketedLoader(store, 4, buckets=["5x16x16"], video_ratio=0.5)
    with pytest.raises(ValueError, match="global batch size"):
        BucketedLoader(store, {"video": 4}, video_ratio=0.5)
    saved = BucketedLoader(store, 4, seed=0).state_dict()
    with pytest.raises(ValueError, match="seed"):
        BucketedLoader(store, 4, seed=1).load_state_dict(saved)


def test_split_even():
    assert split_even(10, 4) == [3, 3, 2, 2] and split_even(2, 4) == [1, 1, 0, 0] and sum(split_even(37, 5)) == 37
