"""The `megawan` command. Subcommands:

    megawan demo [--out DIR]                       the tiny end-to-end job (videos -> latents -> train -> mp4)
    megawan demo --task i2v [--out DIR]            the tiny image-to-video task (first frame + caption -> clip)
    megawan demo --task lora [--base DIR]          a LoRA fine-tune teaches the demo's model a new colour word
    megawan presets                                list model presets and their hyper-parameters
    megawan generate --ckpt DIR --encoders DIR --prompt TEXT [--out OUT.mp4]   sample videos (torchrun: TP / CP)
    megawan generate --ckpt DIR --prompt TEXT --lora style.safetensors:0.8     ... with LoRA files merged in
    megawan serve --ckpt DIR [--encoders DIR] [--port 7860]                    a web page for generation (gradio)
    megawan flops PRESET --frames F --height H --width W [--batch B]   model FLOPs (latent sizes)
"""

from __future__ import annotations

import argparse
import os
import sys

from megawan.config import ParallelConfig, dit_preset, load_config, preset_names
from megawan.utils.user_errors import UserError, run_main

# The other subcommands import their modules when they run: those pull in torch and megatron-core (seconds),
# which `megawan --help` and `megawan presets` should not wait for.


def _cmd_demo(args) -> int:
    if args.base and args.task != "lora":
        raise UserError("--base: only --task lora fine-tunes a finished demo")
    if args.task == "i2v":
        from megawan.demo.i2v_task import I2V_STEPS, run_i2v_task  # lazy: torch and megatron-core

        run_i2v_task(args.out or "runs/i2v", steps=args.steps or I2V_STEPS)
        return 0
    if args.task == "lora":
        from megawan.demo.lora_task import LORA_STEPS, run_lora_task  # lazy: torch and megatron-core

        run_lora_task(args.out or "runs/lora", base=args.base, steps=args.steps or LORA_STEPS)
        return 0
    from megawan.demo.runner import DEMO_STEPS, run_demo

    run_demo(args.out or "runs/demo", steps=args.steps or DEMO_STEPS, nproc=args.nproc)
    return 0


def _cmd_presets(args) -> int:
    print(f"{'preset':18} {'type':5} {'dim':>5} {'ffn':>6} {'heads':>5} {'layers':>6} {'in':>3} {'out':>3}  params")
    for name in preset_names():
        c = dit_preset(name)
        params = _parameter_count(c)
        experts = " x2 experts" if c.expert_boundary else ""
        print(f"{name:18} {c.model_type:5} {c.dim:5} {c.ffn_dim:6} {c.num_heads:5} {c.num_layers:6} {c.in_dim:3} "
              f"{c.out_dim:3}  {params / 1e9:.3f}B{experts}")
    return 0


def _parameter_count(config) -> int:
    from math import prod

    from megawan.convert.dit_keys import dit_param_shapes  # lazy: megawan.convert imports torch

    return sum(prod(s) for s in dit_param_shapes(config).values())


def _cmd_flops(args) -> int:
    c = dit_preset(args.preset)  # a misspelt preset is refused before the slow imports
    from megawan.models.dit import flops  # lazy: torch and megatron-core
    from megawan.models.dit.flops import tokens

    f = flops(c, args.batch, args.frames, args.height, args.width)
    print(f"{args.preset}: {tokens(c, args.frames, args.height, args.width):,} tokens per sample; "
          f"forward {f / 1e12:.2f} TFLOP, training step (3x) {3 * f / 1e12:.2f} TFLOP for batch {args.batch}")
    return 0


def _cmd_train(args) -> int:
    # ConfigError / TrainingError / CheckpointError are user errors: main() prints them as one line
    overrides = tuple(args.overrides) + ((f"checkpoint.init_from={args.init_from}",) if args.init_from else ())
    load_config(args.config, overrides)  # a missing file or a bad override is refused before the slow imports
    from megawan.training.trainer import train  # lazy: torch and megatron-core

    result = train(args.config, overrides)
    return 0 if result["stopped"] is None or result["stopped"].startswith("signal") else 1


def _cmd_generate(args) -> int:
    from megawan.capabilities import cuda_available
    from megawan.generation import GenerationRequest, generate, prepare  # lazy: torch and megatron-core
    from megawan.parallel import initialize

    if args.prompts:
        with open(args.prompts, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
    elif args.prompt:
        prompts = [args.prompt]
    else:
        raise UserError("give --prompt TEXT or --prompts FILE")
    if args.device == "cuda" and not cuda_available():
        raise UserError("--device cuda: this machine has no CUDA device (use --device cpu or auto)")
    from megawan.lora.formats import lora_argument

    loras = tuple(lora_argument(text, "--lora") for text in args.lora)
    guidance = args.guidance
    if guidance is not None and len(guidance) == 1:
        guidance = guidance[0]
    req = GenerationRequest(
        ckpt=args.ckpt, prompts=prompts, out=args.out, encoders=args.encoders, low_noise_ckpt=args.low_noise_ckpt,
        negative_prompt=args.negative_prompt, frames=args.frames, height=args.height, width=args.width,
        steps=args.steps, sampler=args.sampler, shift=args.shift, guidance=guidance, seed=args.seed, fps=args.fps,
        image=args.image, last_image=args.last_image, max_area=args.max_area, noise=args.noise,
        save_latents=args.save_latents, use_ema=not args.no_ema,
        vae_tiling=tuple(args.vae_tiling) if args.vae_tiling else None, device=args.device, loras=loras)
    # a missing or damaged checkpoint, an image that is not one, a flag the model cannot take: named before any
    # process group starts
    prepare(req)
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))
    tp = args.tensor_parallel
    cp = args.context_parallel or max(world // tp, 1)
    # the process group suits the device: gloo for --device cpu (also on a GPU machine), else NCCL where CUDA is
    initialize(ParallelConfig(tensor_parallel=tp, context_parallel=cp, context_parallel_mode=args.cp_mode),
               backend="gloo" if args.device == "cpu" else None, seed=args.seed)
    paths = generate(req)
    for p in paths:
        print(p)
    return 0


def _cmd_serve(args) -> int:
    from megawan.serve import ServeOptions, import_gradio

    import_gradio()  # missing gradio: one line naming `pip install megawan[serve]`, before torch is imported
    from megawan.serve import serve  # lazy: torch and megatron-core

    serve(ServeOptions(ckpt=args.ckpt, encoders=args.encoders, low_noise_ckpt=args.low_noise_ckpt, host=args.host,
                       port=args.port, device=args.device, out=args.out, frames=args.frames, height=args.height,
                       width=args.width, steps=args.steps))
    return 0


def _add_serve(sub) -> None:
    srv = sub.add_parser("serve", help="a web page for generation (gradio): prompt, image, seed, steps, guidance "
                                       "-> video; one process, the model kept loaded")
    srv.add_argument("--ckpt", required=True, help="training checkpoint (or run checkpoint dir), or a megawan pipeline")
    srv.add_argument("--encoders", help="folder with the VAE, umT5 and tokenizer (a pipeline carries its own)")
    srv.add_argument("--low-noise-ckpt", help="A14B trained as two runs: the low-noise expert's checkpoint")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: other machines too)")
    srv.add_argument("--port", type=int, default=7860)
    srv.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                     help="where the DiT, umT5 and VAE run: auto = cuda where CUDA is, else cpu")
    srv.add_argument("--out", default="outputs/serve", help="folder the videos are written to")
    for field in ("frames", "height", "width", "steps"):
        srv.add_argument(f"--{field}", type=int, help=f"the page's starting {field} (default: the model's official)")
    # the checkpoint's checks raise plain ValueErrors naming the option, as generate's
    srv.set_defaults(func=_cmd_serve, user_errors=(ValueError,))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megawan", description="Train Wan-style video diffusion models.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="the tiny end-to-end job on CPU: synthetic videos -> latents -> train on "
                                       "4 ranks -> checkpoint -> held-out colour check -> mp4")
    demo.add_argument("--task", choices=("t2v", "i2v", "lora"), default="t2v",
                      help="t2v: the colour task (text-to-video, 4 ranks); i2v: the image-to-video task (first "
                           "frame + caption, one rank); lora: a LoRA fine-tune of the t2v model teaches it a colour "
                           "word it never saw (one rank)")
    demo.add_argument("--out", default=None, help="output folder (default runs/demo; runs/i2v, runs/lora)")
    demo.add_argument("--base", default=None, help="--task lora: the folder of a finished `megawan demo` to "
                                                   "fine-tune (default: run the demo first, into OUT/base)")
    demo.add_argument("--steps", type=int, default=None, help="training steps (default 1200; i2v 900; lora 300)")
    demo.add_argument("--nproc", type=int, default=4, help="CPU ranks of the t2v task (TP2 x DP nproc/2)")
    demo.set_defaults(func=_cmd_demo)

    train = sub.add_parser("train", help="train under torchrun / srun: megawan train --config FILE [key=value ...]")
    train.add_argument("--config", help="run config YAML (model, parallel, data, optimizer, train, checkpoint)")
    train.add_argument("--init-from", help="warm start (weights only) from a checkpoint or a run's checkpoint dir")
    train.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.steps=100")
    train.set_defaults(func=_cmd_train)

    gen = sub.add_parser("generate", help="sample videos from a checkpoint or converted pipeline (torchrun for "
                                          "TP / CP parallel sampling)")
    gen.add_argument("--ckpt", required=True, help="training checkpoint (or run checkpoint dir), or a megawan pipeline")
    gen.add_argument("--low-noise-ckpt", help="A14B trained as two runs: the low-noise expert's checkpoint")
    gen.add_argument("--encoders", help="folder with the VAE, umT5 and tokenizer (a pipeline carries its own)")
    gen.add_argument("--prompt", help="one prompt")
    gen.add_argument("--prompts", help="a file with one prompt per line")
    gen.add_argument("--negative-prompt", help="default: Wan's negative prompt; the zero null condition for "
                                               "models trained with train.text_dropout")
    gen.add_argument("--frames", type=int, help="video frames, 1 + 4k (default: the model's official setting)")
    gen.add_argument("--height", type=int)
    gen.add_argument("--width", type=int)
    gen.add_argument("--steps", type=int)
    gen.add_argument("--sampler", default="unipc", choices=["unipc", "euler", "dpm++"])
    gen.add_argument("--shift", type=float)
    gen.add_argument("--guidance", type=float, nargs="+", help="one scale, or LOW HIGH for the A14B experts")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--fps", type=int)
    gen.add_argument("--image", help="first frame (image-to-video: Wan2.1 I2V / FLF2V, I2V-A14B, TI2V-5B); without "
                                     "--height / --width the video takes its aspect ratio, as the official repos "
                                     "size it")
    gen.add_argument("--last-image", help="last frame (first-last-frame models: Wan2.1 FLF2V-14B)")
    gen.add_argument("--max-area", type=int, help="image-to-video without --height / --width: the video's pixels "
                                                  "(default: the model's official height x width; 480p: 399360)")
    gen.add_argument("--noise", help="initial latent noise (.pt, [C, T, H, W] or [N, C, T, H, W])")
    gen.add_argument("--save-latents", help="write the final latents [N, C, T, H, W] to this .pt")
    gen.add_argument("--out", default="outputs", help="OUT.mp4 for one prompt, else a folder")
    gen.add_argument("--vae-tiling", type=int, nargs=2, metavar=("TILE", "STRIDE"),
                     help="decode in overlapping spatial tiles (pixels), e.g. 256 192 for 720p on small GPUs")
    gen.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                     help="merge a LoRA file (diffusers or ComfyUI layout) into the DiT's weights: W += SCALE alpha / "
                          "rank B A (repeatable; SCALE default 1)")
    gen.add_argument("--no-ema", action="store_true", help="the trained weights, not their EMA")
    gen.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                     help="where each rank runs the DiT, umT5 (bf16 on CUDA) and the VAE: auto = cuda:LOCAL_RANK "
                          "where CUDA is, else cpu; cpu runs over gloo, cuda over NCCL")
    gen.add_argument("--tensor-parallel", type=int, default=1)
    gen.add_argument("--context-parallel", type=int, help="default: world size / tensor parallel")
    gen.add_argument("--cp-mode", default="ulysses", choices=["ulysses", "ring"])
    # generation's checks raise plain ValueErrors naming the option (--frames, --low-noise-ckpt, ...)
    gen.set_defaults(func=_cmd_generate, user_errors=(ValueError,))

    _add_serve(sub)

    presets = sub.add_parser("presets", help="list model presets")
    presets.set_defaults(func=_cmd_presets)

    fl = sub.add_parser("flops", help="model FLOPs of a preset at a latent size")
    fl.add_argument("preset")
    fl.add_argument("--frames", type=int, required=True, help="latent frames (81 video frames -> 21)")
    fl.add_argument("--height", type=int, required=True, help="latent height (480 px -> 60 with Wan2.1's VAE)")
    fl.add_argument("--width", type=int, required=True, help="latent width (832 px -> 104)")
    fl.add_argument("--batch", type=int, default=1)
    fl.set_defaults(func=_cmd_flops)
    return parser


def main(argv=None) -> int:
    """Exit status: 0 done, 2 a user error (one line on stderr; MEGAWAN_DEBUG=1 adds the traceback), 1 a training
    run that stopped early; a bug raises with its traceback."""
    args = build_parser().parse_args(argv)
    return run_main(f"megawan {args.command}", args.func, args, also=getattr(args, "user_errors", ()))


if __name__ == "__main__":
    sys.exit(main())
