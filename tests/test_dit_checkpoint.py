"""megawan.checkpoint: a DiT saved with megatron-core dist_checkpointing at TP=2 loads at TP=1 and at TP=4 with
exactly the same weights; a training checkpoint's EMA loads in the weights' place (as generation does) exactly
as the trainer's EMA object applies it, and the read-only view that export streams from sees the same tensors
(real checkpoints written and read back, over gloo)."""

import torch

from megawan.checkpoint import (
    CheckpointTensors,
    checkpoint_name,
    checkpoint_step,
    has_ema,
    latest_checkpoint,
    load_checkpoint,
    load_weights,
    read_run_config,
    read_trainer_state,
    resolve_checkpoint,
    save_checkpoint,
    save_model_checkpoint,
)
from megawan.config import DiTConfig, config_to_dict, dit_preset
from megawan.convert import convert_state_dict
from megawan.models.dit import WanDiT
from megawan.parallel.launch import spawn_local
from megawan.training.ema import EMA
from wan_reference import diffusers_dit


def _model(cfg_dict, weights_path=None):
    from megatron.core import parallel_state

    cfg = DiTConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg_dict.items()})
    model = WanDiT(cfg)
    if weights_path is not None:
        tp, rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
        full = torch.load(weights_path)
        model.load_state_dict(convert_state_dict(full, "megawan", "megawan", cfg, tp_size=tp)[rank])
    return model


def _save(rank, cfg_dict, weights_path, ckpt_dir):
    save_model_checkpoint(ckpt_dir, [_model(cfg_dict, weights_path)], {"model": cfg_dict}, {"step": 0})


def _load(rank, cfg_dict, ckpt_dir, out_dir):
    from megatron.core import parallel_state

    model = _model(cfg_dict)
    load_weights(ckpt_dir, [model])
    tensors = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    torch.save(tensors, f"{out_dir}/tp{parallel_state.get_tensor_model_parallel_world_size()}_rank{rank}.pt")


def test_save_at_tp2_load_at_tp1_and_tp4(tmp_path):
    cfg = dit_preset("tiny-i2v", num_heads=4)
    cfg_dict = config_to_dict(cfg)
    full = convert_state_dict(diffusers_dit(cfg).state_dict(), "diffusers", "megawan", cfg)
    torch.save(full, tmp_path / "weights.pt")
    ckpt = tmp_path / "ckpt"
    spawn_local(_save, world_size=2, tensor_parallel=2, args=(cfg_dict, str(tmp_path / "weights.pt"), str(ckpt)))

    assert ckpt.is_dir() and not (tmp_path / "ckpt.tmp").exists()
    assert resolve_checkpoint(str(ckpt)) == str(ckpt) and read_trainer_state(str(ckpt)) == {"step": 0}
    assert read_run_config(str(ckpt)) == {"model": cfg_dict} and not has_ema(str(ckpt))

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

    view = CheckpointTensors(str(ckpt))  # no process group: what export streams from
    assert sorted(view.keys()) == sorted(full)
    assert all(torch.equal(view.get(k), v) for k, v in full.items())


class _NoOptimizer:
    def sharded_state_dict(self, model_sharded, **kwargs):
        return {}


def _save_training(rank, cfg_dict, weights_path, root):
    model = _model(cfg_dict, weights_path)
    ema = EMA([model], 0.0)
    for average in ema.averages:  # an average that differs from the (bf16) weights in fp32
        average.mul_(0.5).add_(0.3)
    for step in (1, 2):
        save_checkpoint(root, step, [model], _NoOptimizer(), {"step": step}, {"model": cfg_dict}, ema=ema, keep=1)


def _load_ema(rank, cfg_dict, root, out_dir):
    path = resolve_checkpoint(root)
    generation = _model(cfg_dict)
    load_weights(path, [generation], ema=True)
    trainer = _model(cfg_dict)
    ema = EMA([trainer], 0.0)
    load_checkpoint(path, [trainer], ema=ema)
    ema.apply()
    torch.save({"generation": generation.state_dict(), "trainer": trainer.state_dict()}, f"{out_dir}/ema.pt")


def test_ema_weights_load_in_place_of_the_model_weights(tmp_path):
    cfg = dit_preset("tiny", num_heads=4, params_dtype="bfloat16")
    cfg_dict = config_to_dict(cfg)
    full = {k: v.to(torch.bfloat16) for k, v in
            convert_state_dict(diffusers_dit(cfg).state_dict(), "diffusers", "megawan", cfg).items()}
    torch.save(full, tmp_path / "weights.pt")
    root = str(tmp_path / "run")
    spawn_local(_save_training, world_size=2, tensor_parallel=2, args=(cfg_dict, str(tmp_path / "weights.pt"), root))

    path = latest_checkpoint(root)
    assert checkpoint_step(path) == 2 and path.endswith(checkpoint_name(2)) and has_ema(path)
    assert read_trainer_state(path) == {"step": 2}
    averaged = {k: v.float() * 0.5 + 0.3 for k, v in full.items()}
    view = CheckpointTensors(path, ema=True)
    assert sorted(view.keys()) == sorted(full)
    assert all(view.get(k).dtype == torch.float32 and torch.equal(view.get(k), v) for k, v in averaged.items())
    assert all(torch.equal(CheckpointTensors(path).get(k), v) for k, v in full.items())

    spawn_local(_load_ema, world_size=1, tensor_parallel=1, args=(cfg_dict, root, str(tmp_path)))
    loaded = torch.load(tmp_path / "ema.pt")
    for key, value in averaged.items():
        assert torch.equal(loaded["generation"][key], value.to(torch.bfloat16)), key
        assert torch.equal(loaded["generation"][key], loaded["trainer"][key]), key
