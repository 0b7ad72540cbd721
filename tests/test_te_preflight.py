"""What the te backend cannot run is refused before any rank starts, naming the field and the alternative;
model.backend=auto settles for local instead, saying why. Where a refusal needs Transformer Engine installed,
`transformer_engine_available` is patched to True: that selects the branch, nothing runs on TE."""

import dataclasses
import os
from unittest import mock

import pytest
import torch

import megawan.capabilities as capabilities
from megawan.config import ConfigError, ParallelConfig, load_config
from megawan.config.te_limits import CP_COMM_TYPES, te_fp8_problem, te_token_multiple, te_tokens_problem
from megawan.training.trainer import preflight

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "configs",
                      "tiny_train.yaml")
needs_no_te = pytest.mark.skipif(capabilities.transformer_engine_available(), reason="checks the machine without TE")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Two buckets of the tiny VAE (stride 4, 8, 8; patch 1, 2, 2): 1x32x32 -> 4 tokens, 17x32x48 -> 30."""
    from megawan.data.store import LatentStore, Sample

    path = str(tmp_path_factory.mktemp("te") / "store.zarr")
    store = LatentStore.create(path, vae={"name": "t", "z_dim": 4, "stride": [4, 8, 8]},
                               text_encoder={"name": "t", "max_length": 24, "dim": 32})
    writer = store.writer(0)
    for i, (bucket, shape) in enumerate([("1x32x32", (4, 1, 4, 4)), ("17x32x48", (4, 5, 4, 6))] * 2):
        writer.write(Sample(id=f"s{i}", bucket=bucket, latents=torch.zeros(shape), text=torch.zeros(24, 32),
                            text_length=3))
    return path


def _preflight(store, *overrides, te=True):
    cfg = load_config(CONFIG, (f"data.store={store}", *overrides))
    with mock.patch.object(capabilities, "transformer_engine_available", lambda: te):
        return preflight(cfg, world_size=2)


CP2 = ("parallel.tensor_parallel=1", "parallel.context_parallel=2")


def test_the_rules_read_from_te():
    ulysses_sp = ParallelConfig(tensor_parallel=2, sequence_parallel=True, context_parallel=4)
    assert CP_COMM_TYPES == {"ulysses": "a2a", "ring": "p2p", "2d": "a2a+p2p"}
    assert te_token_multiple(ParallelConfig(tensor_parallel=4, sequence_parallel=True)) == 1  # masked padding
    assert te_token_multiple(ulysses_sp) == 8  # CP x TP splits, each CP chunk cut in halves
    assert te_token_multiple(ParallelConfig(context_parallel=8, context_parallel_mode="2d", ulysses_size=2)) == 16
    assert te_tokens_problem(32760, ulysses_sp) is None  # 81x480x832
    assert "18900 video tokens are not a multiple of 8" in te_tokens_problem(18900, ulysses_sp)  # 81x480x480
    assert te_fp8_problem(5120, 13824, 512, 32760, 1, ParallelConfig(tensor_parallel=4)) is None
    # 81x480x832 split over CP4 x SP2: 4095 rows per rank, which TE's FP8 GEMM does not take
    assert "4095 rows per rank" in te_fp8_problem(5120, 13824, 512, 32760, 1, ulysses_sp)


@needs_no_te
def test_te_without_transformer_engine_is_refused_naming_the_alternative(store):
    with pytest.raises(ConfigError, match=r"^model\.backend: te needs Transformer Engine.*model\.backend=local"):
        _preflight(store, "model.backend=te", te=False)


@needs_no_te
def test_delayed_fp8_without_transformer_engine_runs_on_the_local_backend(store):
    # the local FP8 linears keep their own amax history (megawan/models/dit/fp8_linear.py)
    assert _preflight(store, "train.fp8=delayed", te=False)["backend"] == "local"


def test_a_bucket_tes_context_parallelism_cannot_split_is_refused(store):
    with pytest.raises(ConfigError, match=r"^data\.buckets: 17x32x48: 30 video tokens are not a multiple of 4.*"
                                          r"model\.backend=local"):
        _preflight(store, *CP2, "model.backend=te")
    assert _preflight(store, *CP2, "model.backend=te", "data.buckets=[1x32x32]",
                      "data.video_ratio=0.0")["backend"] == "te"  # 4 tokens: 2 per rank, even


def test_auto_settles_for_local_where_te_cannot_run_and_says_why(store):
    facts = _preflight(store, *CP2, "model.backend=auto")
    assert facts["backend"] == "local" and "data.buckets: 17x32x48" in facts["backend_reason"]
    assert _preflight(store, "model.backend=auto")["backend"] == "te"  # TP2 without CP: padding is masked
    assert _preflight(store, *CP2, "model.backend=auto", "train.fp8=delayed")["backend"] == "local"


def test_held_out_buckets_count_too(store):
    with pytest.raises(ConfigError, match=r"^validation\.store: 17x32x48: 30 video tokens"):
        _preflight(store, *CP2, "model.backend=te", "data.buckets=[1x32x32]", "data.video_ratio=0.0",
                   "validation.every=1", f"validation.store={store}")


def test_a_head_dim_tes_context_parallelism_cannot_take_is_refused_at_load():
    with pytest.raises(ConfigError, match=r"^model\.num_heads: .*multiple of 8, got 12; model\.backend=local"):
        load_config(CONFIG, (*CP2, "model.backend=te", "model.dim=24"))


def test_fp8_shapes_tes_linears_cannot_take_are_refused(store):
    # micro batch 2 x 30 tokens = 60 rows, not a multiple of 8
    with pytest.raises(ConfigError, match=r"^train\.fp8: 17x32x48: 30 video tokens give 60 rows.*model\.backend=local"):
        _preflight(store, "model.backend=te", "train.fp8=current")


def test_generation_samples_where_te_can_and_falls_back_where_it_cannot():
    """`megawan generate` on a TE machine: a size TE's context parallelism cannot split samples on the local
    backend under `auto`, and is refused (naming the sizes) under an explicit `te`."""
    from megawan.config import dit_preset
    from megawan.generation import sampling_backend

    cp2 = ParallelConfig(context_parallel=2, context_parallel_mode="ring")
    auto, te = dit_preset("tiny"), dataclasses.replace(dit_preset("tiny"), backend="te")
    with mock.patch.object(capabilities, "transformer_engine_available", lambda: True):
        assert sampling_backend(auto, (4, 5, 4, 8), cp2) == (auto, None)  # 5 x 2 x 4 = 40 tokens: 4 divides
        local, why = sampling_backend(auto, (4, 5, 4, 6), cp2)  # 30 tokens
        assert local.backend == "local" and "30 video tokens are not a multiple of 4" in why
        with pytest.raises(ValueError, match=r"^--frames / --height / --width: 30 video tokens"):
            sampling_backend(te, (4, 5, 4, 6), cp2)
        assert sampling_backend(auto, (4, 5, 4, 6), ParallelConfig())[0] is auto  # no CP: padding is masked
