"""The Zarr latent store: lossless bf16, metadata per sample, one part per writer, commit-last writes that
survive a kill, and refusal to mix encoders."""

import numpy as np
import pytest
import torch

from megawan.data.store import LatentStore, Sample
from megawan.data.store_metadata import StoreMetadata, StoreMetadataError, TextEncoderMetadata, VAEMetadata

VAE = {"name": "tiny-2.1", "z_dim": 4, "stride": [4, 8, 8]}
TEXT = {"name": "tiny", "max_length": 8, "dim": 6}


def _sample(i, bucket="5x16x16", dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(i)
    return Sample(id=f"clip{i}", bucket=bucket, latents=torch.randn(4, 2, 2, 2, generator=g).to(dtype),
                  text=torch.randn(8, 6, generator=g).to(dtype), text_length=3 + i % 4, source=f"/v/{i}.mp4",
                  caption=f"caption {i}", fps=16.0, frame_indices=np.arange(5) * 2 + i)


def test_round_trip_is_lossless_and_keeps_metadata(tmp_path):
    store = LatentStore.create(str(tmp_path / "s.zarr"), vae=VAE, text_encoder=TEXT)
    writer = store.writer(0)
    samples = [_sample(i) for i in range(3)] + [_sample(9, bucket="1x16x16", dtype=torch.float32)]
    for s in samples:
        writer.write(s)
    reader = LatentStore.open(str(tmp_path / "s.zarr"))
    assert reader.buckets() == ["1x16x16", "5x16x16"] and reader.count("5x16x16") == 3
    assert reader.attrs["vae"] == VAE
    got = reader.read("5x16x16", 1)
    assert got["latents"].dtype == torch.bfloat16 and torch.equal(got["latents"], samples[1].latents)
    assert torch.equal(got["text"], samples[1].text)
    assert (got["id"], got["caption"], got["source"], got["text_length"]) == ("clip1", "caption 1", "/v/1.mp4", 4)
    assert list(got["frame_indices"]) == [1, 3, 5, 7, 9]
    assert reader.read("1x16x16", 0)["latents"].dtype == torch.float32
    assert sorted(reader.ids()) == ["clip0", "clip1", "clip2", "clip9"]


def test_writers_have_their_own_parts_and_a_kill_loses_nothing(tmp_path):
    path = str(tmp_path / "s.zarr")
    store = LatentStore.create(path, vae=VAE, text_encoder=TEXT)
    a, b = store.writer(0), store.writer(1)
    a.write(_sample(0))
    b.write(_sample(1))
    # rank 0 is killed after writing sample 2's arrays but before its commit: count did not move
    part = store.root["buckets"]["5x16x16"]["part-00000"]
    part["latents"].resize((2, 4, 2, 2, 2))
    part["latents"][1] = np.zeros((4, 2, 2, 2), dtype=np.uint16)
    resumed = LatentStore.create(path, vae=VAE, text_encoder=TEXT)  # same encoders: resume
    assert sorted(resumed.ids()) == ["clip0", "clip1"]
    done = set(resumed.ids())
    w = resumed.writer(0)
    for s in (_sample(0), _sample(1), _sample(2)):
        if s.id not in done:
            w.write(s)
    reader = LatentStore.open(path)
    assert sorted(reader.ids()) == ["clip0", "clip1", "clip2"] and reader.count("5x16x16") == 3
    by_id = {reader.read("5x16x16", i)["id"]: reader.read("5x16x16", i) for i in range(3)}
    assert torch.equal(by_id["clip2"]["latents"], _sample(2).latents)


def test_refuses_other_encoders_and_misfit_samples(tmp_path):
    path = str(tmp_path / "s.zarr")
    LatentStore.create(path, vae=VAE, text_encoder=TEXT).writer(0).write(_sample(0))
    with pytest.raises(ValueError, match="different vae"):
        LatentStore.create(path, vae=dict(VAE, z_dim=16), text_encoder=TEXT)
    bad = _sample(1)
    bad.latents = torch.zeros(4, 3, 2, 2, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="does not fit bucket"):
        LatentStore.open(path, mode="r+").writer(0).write(bad)
    with pytest.raises(FileNotFoundError):
        LatentStore.open(str(tmp_path / "missing.zarr"))


def test_metadata_is_typed_round_trips_and_names_a_missing_field(tmp_path):
    vae = VAEMetadata(name="tiny-2.1", z_dim=4, stride=(4, 8, 8), latents_mean=(0.5, 0.0, 0.0, 0.0),
                      latents_std=(2.0, 1.0, 1.0, 1.0), weights="abc")
    meta = StoreMetadata(vae=vae, text_encoder=TextEncoderMetadata(name="tiny", max_length=8, dim=6),
                         buckets=("5x16x16",), fps=16.0, dtype="bfloat16", logvar=False, manifest="/m.jsonl")
    path = str(tmp_path / "s.zarr")
    LatentStore.create(path, **meta.to_attrs())
    store = LatentStore.open(path)
    assert store.metadata == meta
    assert store.attrs["vae"]["stride"] == [4, 8, 8] and "preset" not in store.attrs["vae"]  # the on-disk keys
    LatentStore.create(path, **meta.to_attrs())  # the same encoders: a resume, not a refusal
    mean, std = store.metadata.vae.normalization()
    assert mean.shape == std.shape == (1, 4, 1, 1, 1) and (mean[0, 0].item(), std[0, 0].item()) == (0.5, 2.0)
    # a store without statistics trains its latents as stored; one without a field readers need is refused
    plain = LatentStore.create(str(tmp_path / "plain.zarr"), vae=VAE, text_encoder=TEXT)
    mean, std = plain.metadata.vae.normalization()
    assert torch.equal(mean, torch.zeros(1, 4, 1, 1, 1)) and torch.equal(std, torch.ones(1, 4, 1, 1, 1))
    old = LatentStore.create(str(tmp_path / "old.zarr"), vae={"name": "tiny-2.1", "z_dim": 4}, text_encoder=TEXT)
    with pytest.raises(StoreMetadataError, match=r"no 'vae\.stride'"):
        old.metadata
