"""One flow-matching optimizer step (megatron schedules, DDP, distributed optimizer, AdamW with weight
decay and clipping) under each layout gives the single-rank losses, gradient norm and updated parameters,
fp32, <= 1e-5 relative.

Updated parameters are compared per tensor in norm, ||got - ref|| / ||ref||. Elementwise, Adam's first
step is lr * g / (|g| + eps): for the few elements whose gradient is near zero (~eps) the update follows
fp32 summation noise of g, which TP and ring attention reorder; such an element can move by a sizeable
fraction of lr. The loss and gradient norm, which no such amplification touches, are compared elementwise.

The image-to-video models (Wan2.1 I2V and FLF2V with CLIP tokens, Wan2.2 I2V-A14B without) take their inputs as
the trainer assembles them from an image-conditioned store (megawan.training.conditioning); they and Wan2.2 TI2V
(micro-batches mixing its text-to-video and image-to-video samples) are checked under TP2 x PP2 x CP2 together.
"""

import dataclasses

import pytest
import torch

from megawan.config import DiTConfig, ParallelConfig, dit_preset
from megawan.convert import convert_state_dict
from megawan.convert.dit_keys import TP_AXIS
from megawan.convert.tensor_parallel import tp_axis
from megawan.data.conditioning import frame_mask
from megawan.diffusion import FlowMatching
from megawan.models.dit.parallelize import build_model_chunks, chunk_state_dict
from megawan.parallel.cpu_compat import megatron_cpu_mode
from megawan.parallel.launch import spawn_local
from megawan.training.optimizer import build_optimizer, wrap_data_parallel
from megawan.training.conditioning import image_for_model, image_inputs
from megawan.training.schedule import forward_backward
from wan_reference import diffusers_dit

MICRO_BATCHES = 4  # per data-parallel replica
MICRO_BATCH_SIZE = 2
LATENT = (3, 4, 6)  # 18 tokens: CP=4 pads to 20

LAYOUTS = {  # (TP, PP, CP, DP) + options
    "single": dict(),
    "tp2": dict(tensor_parallel=2),
    "pp2": dict(pipeline_parallel=2),
    "pp2-interleaved": dict(pipeline_parallel=2, virtual_pipeline=2),
    "cp2-ulysses": dict(context_parallel=2),
    "cp2-ring": dict(context_parallel=2, context_parallel_mode="ring"),
    "dp2-distributed-optimizer": dict(world=2),
    "tp2-pp2": dict(tensor_parallel=2, pipeline_parallel=2),
    "tp2-cp2": dict(tensor_parallel=2, context_parallel=2),
    "cp4-2d": dict(context_parallel=4, context_parallel_mode="2d", ulysses_size=2),
    "tp2-pp2-cp2": dict(tensor_parallel=2, pipeline_parallel=2, context_parallel=2),
    "tp2-sp": dict(tensor_parallel=2, sequence_parallel=True),
    "tp2-sp-cp2-ring": dict(tensor_parallel=2, sequence_parallel=True, context_parallel=2, context_parallel_mode="ring"),
}


def _world(layout: dict) -> int:
    layout = dict(layout)
    if "world" in layout:
        return layout["world"]
    return layout.get("tensor_parallel", 1) * layout.get("pipeline_parallel", 1) * layout.get("context_parallel", 1)


def flow_forward_step(data_iterator, model):
    """megatron's forward_step contract: (output, loss_fn). Non-last pipeline stages never call loss_fn.
    A micro-batch holds the model's inputs already noised (x_t, timestep, text) and the velocity target."""
    batch = next(data_iterator)
    output = model(batch["x_t"], batch["timestep"], batch["text"], image=batch.get("image"))

    def loss_fn(prediction):
        loss = FlowMatching.loss(prediction, batch["target"], batch.get("mask"))
        return loss, {"loss": loss.detach().clone()}

    return output, loss_fn


def train_step(chunks: list, optimizer, microbatches: list, tokens: int, micro_batch_size: int):
    """Forward / backward over the micro-batches through megatron's schedule, gradient reduction, optimizer
    step. Returns (per-micro-batch losses on the last pipeline stage, else [], gradient norm)."""
    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    iterators = [iter(microbatches) for _ in chunks]
    results = forward_backward(chunks, flow_forward_step, iterators, len(microbatches), tokens, micro_batch_size)
    _, grad_norm, _ = optimizer.step()
    return [r["loss"].item() for r in results], grad_norm


def _worker(rank, setup_path, out_dir, layout, micro_batches=MICRO_BATCHES):
    setup = torch.load(setup_path, weights_only=False)
    for name, one in ([("", setup)] if "config" in setup else setup.items()):  # one model, or {name: model}
        torch.save(_step(one, layout, micro_batches), f"{out_dir}/{name}rank{rank}.pt")


def _step(setup, layout, micro_batches):
    """One training step of the model `setup` describes, in this rank's share of `layout`."""
    from megatron.core import parallel_state as ps

    cfg = DiTConfig(**setup["config"])
    parallel = ParallelConfig(**{k: v for k, v in layout.items() if k != "world"})
    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    full = setup["state_dict"]
    shard = convert_state_dict(full, "megawan", "megawan", cfg, tp_size=tp)[tp_rank] if tp > 1 else full
    micro_batches = setup.get("micro_batches", micro_batches)
    with megatron_cpu_mode():
        chunks = build_model_chunks(cfg, parallel)
        for chunk in chunks:
            chunk.load_state_dict(chunk_state_dict(shard, chunk))
        ddp_chunks = wrap_data_parallel(chunks, distributed_optimizer=True)
        optimizer = build_optimizer(ddp_chunks, lr=1e-3, weight_decay=0.1, clip_grad=1.0)
        dp_rank = ps.get_data_parallel_rank()
        mine = setup["microbatches"][dp_rank * micro_batches:(dp_rank + 1) * micro_batches]
        losses, grad_norm = train_step(ddp_chunks, optimizer, mine, setup["tokens"], MICRO_BATCH_SIZE)
    params = {}
    for chunk in chunks:
        for name, p in chunk.named_parameters():
            parts = name.split(".")
            if parts[0] == "blocks":
                parts[1] = str(chunk.layers[int(parts[1])])
            params[".".join(parts)] = p.detach().clone()
    return dict(losses=losses, grad_norm=float(grad_norm), params=params, tp_rank=tp_rank)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cfg = dit_preset("tiny", num_heads=4, num_layers=4)
    g = torch.Generator().manual_seed(0)
    flow = FlowMatching(shift=3.0)
    microbatches = []
    for _ in range(2 * MICRO_BATCHES):  # enough for DP=2
        x0 = torch.randn(MICRO_BATCH_SIZE, cfg.in_dim, *LATENT, generator=g)
        noise = torch.randn(x0.shape, generator=g)
        t = flow.sample_timesteps(MICRO_BATCH_SIZE, generator=g)
        x_t, target = flow.noised(x0, noise, t)
        microbatches.append(dict(x_t=x_t, timestep=flow.model_timesteps(t), target=target,
                                 text=torch.randn(MICRO_BATCH_SIZE, 7, cfg.text_dim, generator=g)))
    path = tmp_path_factory.mktemp("step") / "setup.pt"
    torch.save(dict(config=dataclasses.asdict(cfg), microbatches=microbatches, tokens=3 * 2 * 3,
                    state_dict=convert_state_dict(diffusers_dit(cfg).state_dict(), "diffusers", "megawan", cfg)), path)
    return path


def _run(setup, tmp_path, name):
    layout = LAYOUTS[name]
    world = _world(layout)
    out = tmp_path / name
    out.mkdir()
    parallel = {k: v for k, v in layout.items() if k != "world"}
    spawn_local(_worker, world_size=world, args=(str(setup), str(out), layout), **parallel)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory):
    """Single-rank runs: over one replica's micro-batches, and over both DP replicas' (for DP=2)."""
    refs = {}
    for replicas in (1, 2):
        out = tmp_path_factory.mktemp(f"single{replicas}")
        spawn_local(_worker, world_size=1, args=(str(setup), str(out), {}, replicas * MICRO_BATCHES))
        refs[replicas] = torch.load(out / "rank0.pt", weights_only=False)
    return refs


@pytest.mark.parametrize("name", [n for n in LAYOUTS if n != "single"])
def test_layout_step_equals_single_rank(setup, reference, tmp_path, name):
    ranks = _run(setup, tmp_path, name)
    dp = 2 if name.startswith("dp2") else 1
    _assert_step_equal(ranks, reference[dp], name, dp)


def _assert_step_equal(ranks, ref, name, dp=1):
    losses = [l for r in ranks for l in r["losses"]]
    if dp == 1:
        last = [r["losses"] for r in ranks if r["losses"]][0]  # every last-stage rank reports the same losses
        torch.testing.assert_close(torch.tensor(last), torch.tensor(ref["losses"]), rtol=1e-5, atol=0)
    else:
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref["losses"]), rtol=1e-5, atol=0)
    assert abs(ranks[0]["grad_norm"] - ref["grad_norm"]) <= 1e-5 * ref["grad_norm"]
    # updated parameters: gather TP splits, check every parameter is present and equal
    tp = max(r["tp_rank"] for r in ranks) + 1
    for pname, expected in ref["params"].items():
        pieces = {}
        for r in ranks:
            if pname in r["params"]:
                pieces.setdefault(r["tp_rank"], r["params"][pname])
        assert len(pieces) == tp, f"{name}: {pname} held by TP ranks {sorted(pieces)}"
        axis = tp_axis(pname, TP_AXIS)
        got = pieces[0] if axis is None else torch.cat([pieces[t] for t in range(tp)], dim=axis)
        rel = ((got - expected).norm() / expected.norm()).item()
        assert rel <= 1e-5, f"{name}: updated {pname} differs by {rel:.2e} (relative, in norm)"


# ----------------------------------------------------------------------------------------------
# Image-to-video: the trainer's input assembly (megawan.training.conditioning) on an image-conditioned batch

IMAGE_TOKENS = 7  # CLIP tokens per conditioning frame (257 for Wan2.1's ViT-H/14)
I2V_VARIANTS = {  # Wan2.1 I2V (CLIP tokens), Wan2.1 FLF2V (both frames' tokens, learned positions), Wan2.2 A14B
    "i2v": ("i2v", dict()),
    "flf2v": ("flf2v", dict(image_pos_len=2 * IMAGE_TOKENS)),
    "i2v-a14b": ("i2v", dict(image_dim=None, expert_boundary=0.9)),
}


def _i2v_setup(kind, overrides, g, flow):
    """The micro-batches of a tiny image-conditioned model, assembled from a store-like batch (raw latents and
    conditioning latents, the uint8 frame mask, CLIP tokens) exactly as the trainer does."""
    cfg = dit_preset("tiny-i2v", num_heads=4, num_layers=2, **overrides)  # one block per pipeline stage
    n, z, (lt, lh, lw) = 2 * MICRO_BATCH_SIZE, cfg.out_dim, LATENT
    mean, std = torch.randn(1, z, 1, 1, 1, generator=g), 0.5 + torch.rand(1, z, 1, 1, 1, generator=g)
    tokens = IMAGE_TOKENS * (2 if kind == "flf2v" else 1)
    batch = dict(latents=torch.randn(n, z, *LATENT, generator=g), cond_latents=torch.randn(n, z, *LATENT, generator=g),
                 cond_mask=frame_mask(kind, 4 * (lt - 1) + 1, 4).expand(n, 4, lt),
                 clip_tokens=torch.randn(n, tokens, 20, generator=g))
    x0 = (batch["latents"] - mean) / std
    noise = torch.randn(x0.shape, generator=g)
    t = flow.sample_timesteps(n, generator=g)
    x_t, target = flow.noised(x0, noise, t)
    condition, image = image_inputs(batch, cfg, n, mean, std)
    assert condition.shape == (n, cfg.in_dim - z, *LATENT) and (image is None) == (cfg.image_dim is None)
    x_in = torch.cat([x_t, condition], dim=1)
    text = torch.randn(n, 7, cfg.text_dim, generator=g)
    microbatches = []
    for s in range(0, n, MICRO_BATCH_SIZE):
        sl = slice(s, s + MICRO_BATCH_SIZE)
        microbatches.append(dict(x_t=x_in[sl], timestep=flow.model_timesteps(t[sl]), target=target[sl],
                                 text=text[sl], image=image_for_model(image, sl, cfg)))
    return dict(config=dataclasses.asdict(cfg), microbatches=microbatches, tokens=lt * (lh // 2) * (lw // 2),
                micro_batches=len(microbatches),
                state_dict=convert_state_dict(diffusers_dit(cfg).state_dict(), "diffusers", "megawan", cfg))


def _ti2v_setup(g, flow):
    """Wan2.2 TI2V micro-batches mixing its two modes (megawan.diffusion.trains_image_to_video chooses per sample):
    image-to-video samples keep their first latent frame clean (timestep 0 on its tokens, out of the loss),
    text-to-video ones are noised whole; every mix of the two appears in a micro-batch."""
    cfg = dit_preset("tiny-ti2v", num_heads=4, num_layers=2, in_dim=4, out_dim=4)
    microbatches = []
    for m in range(4):
        x0 = torch.randn(MICRO_BATCH_SIZE, cfg.in_dim, *LATENT, generator=g)
        noise = torch.randn(x0.shape, generator=g)
        t = flow.sample_timesteps(MICRO_BATCH_SIZE, generator=g)
        clean = torch.tensor([m % 2 == 0, m >= 2])  # both clean, one of each, neither
        x_t, target, timestep, mask = flow.clean_first_frame(x0, noise, t, cfg.patch_size, clean)
        microbatches.append(dict(x_t=x_t, timestep=timestep, target=target, mask=mask,
                                 text=torch.randn(MICRO_BATCH_SIZE, 7, cfg.text_dim, generator=g)))
    lt, lh, lw = LATENT
    return dict(config=dataclasses.asdict(cfg), microbatches=microbatches, tokens=lt * (lh // 2) * (lw // 2),
                micro_batches=len(microbatches),
                state_dict=convert_state_dict(diffusers_dit(cfg).state_dict(), "diffusers", "megawan", cfg))


def test_image_conditioned_steps_under_tp2_pp2_cp2_equal_one_rank(tmp_path):
    """Wan2.1 I2V, FLF2V, Wan2.2 I2V-A14B and TI2V (both modes mixed): one step each on TP2 x PP2 x CP2 (8 ranks)
    equals one rank. The models run one after the other in the same two launches (a launch costs more than a tiny
    step)."""
    g, flow = torch.Generator().manual_seed(1), FlowMatching(shift=3.0)
    setups = {name: _i2v_setup(kind, overrides, g, flow) for name, (kind, overrides) in I2V_VARIANTS.items()}
    setups["ti2v"] = _ti2v_setup(g, flow)
    path = tmp_path / "variants.pt"
    torch.save(setups, path)
    layout = LAYOUTS["tp2-pp2-cp2"]
    for out, world, parallel in ((tmp_path / "single", 1, {}), (tmp_path / "layout", _world(layout), layout)):
        out.mkdir()
        spawn_local(_worker, world_size=world, args=(str(path), str(out), parallel), **parallel)
    for name in setups:
        ref = torch.load(tmp_path / "single" / f"{name}rank0.pt", weights_only=False)
        ranks = [torch.load(tmp_path / "layout" / f"{name}rank{r}.pt", weights_only=False) for r in range(8)]
        assert any("image_embedding" in p for p in ref["params"]) == (name in ("i2v", "flf2v"))
        _assert_step_equal(ranks, ref, f"{name} tp2-pp2-cp2")
