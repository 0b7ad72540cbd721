"""sharded_state_dict(): a DiT saved with megatron-core dist_checkpointing at TP=2 loads at TP=1 and at
TP=4 with exactly the same weights (real checkpoints written and read back, over gloo)."""

import dataclasses

import torch

from megawan.checkpointing import load_model, save_model
from megawan.config import DiTConfig, dit_preset
from megawan.convert import convert_state_dict
from megawan.models.dit import WanDiT
from megawan.parallel.launch import spawn_local
from wan_reference import diffusers_dit


def _save(rank, cfg_dict, weights_path, ckpt_dir):
    from megatron.core import parallel_state

    cfg = DiTConfig(**cfg_dict)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    full = torch.load(weights_path)
    model = WanDiT(cfg)
    model.load_state_dict(convert_state_dict(full, "megawan", "megawan", cfg, tp_size=tp)[parallel_state.get_tensor_model_parallel_rank()])
    save_model(model, ckpt_dir)


def _load(rank, cfg_dict, ckpt_dir, out_dir):
    from megatron.core import parallel_state

    model = WanDiT(DiTConfig(**cfg_dict))
    load_model(model, ckpt_dir)
    tensors = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    torch.save(tensors, f"{out_dir}/tp{parallel_state.get_tensor_model_parallel_world_size()}_rank{rank}.pt")


def test_save_at_tp2_load_at_tp1_and_tp4(tmp_path):
    cfg = dit_preset("tiny-i2v", num_heads=4)
    cfg_dict = dataclasses.asdict(cfg)
    full = convert_state_dict(diffusers_dit(cfg).state_dict(), "diffusers", "megawan", cfg)
    torch.save(full, tmp_path / "weights.pt")
    ckpt = tmp_path / "ckpt"
    spawn_local(_save, world_size=2, tensor_parallel=2, args=(cfg_dict, str(tmp_path / "weights.pt"), str(ckpt)))

    assert ckpt.is_dir() and not (tmp_path / "ckpt.tmp").exists()

    spawn_local(_load, world_size=1, tensor_parallel=1, args=(cfg_dict, str(ckpt), str(tmp_path)))
    loaded = torch.load(tmp_path / "tp1_rank0.pt")
    assert set(loaded) == set(full)
    for key, tensor in full.items():
        assert torch.equal(loaded[key], tensor), key

    spawn_local(_load, world_size=4, tensor_parallel=4, args=(cfg_dict, str(ckpt), str(tmp_path)))
    shards = [torch.load(tmp_path / f"tp4_rank{r}.pt") for r in range(4)]
    merged = convert_state_dict(shards, "megawan", "megawan", cfg)
    for key, tensor in full.items():
        assert torch.equal(merged[key], tensor), key
