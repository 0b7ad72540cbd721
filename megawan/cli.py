"""The `megawan` command. Subcommands (docs/cli.md: every flag, exit codes, Megatron-LM / NeMo names):

    megawan demo [--out DIR]                       the tiny end-to-end job (videos -> latents -> train -> mp4)
    megawan demo --task i2v [--out DIR]            the tiny image-to-video task (first frame + caption -> clip)
    megawan demo --task lora [--base DIR]          a LoRA fine-tune teaches the demo's model a new colour word
    megawan train --config FILE [key=value ...]    train under torchrun / srun (--print-config: the resolved YAML)
    megawan train-vae --config FILE [key=value ...]   train a Wan-VAE (L1 / KL / LPIPS / GAN) under torchrun / srun
    megawan presets                                list model presets and their hyper-parameters
    megawan generate --ckpt DIR --encoders DIR --prompt TEXT [--out OUT.mp4]   sample videos (torchrun: TP / CP);
                                                   writes OUT.json beside each video (what was asked and resolved)
    megawan generate --ckpt DIR --prompt TEXT --lora style.safetensors:0.8     ... with LoRA files merged in
    megawan eval --ckpt DIR --encoders DIR [--suite synthetic | --prompts FILE] --out DIR   generate and score:
                                                   colour / shape / direction accuracy, FVD (--reference, --i3d),
                                                   VAE PSNR / SSIM / LPIPS (--vae, --vae-clips); a row per run
    megawan flops PRESET --frames F --height H --width W [--batch B]   model FLOPs at a VIDEO size (--latent: latents)
    megawan env                                    versions, GPUs, what backend: auto and MEGAWAN_KERNELS resolve to
    megawan --version
    megawan serve --ckpt DIR [--encoders DIR] [--port 7860]   a web page for generation (gradio)

Exit status: 0 done; 2 a mistake on the command line or in a named file (one line `megawan CMD: message` on
stderr, no traceback; MEGAWAN_DEBUG=1 adds it); 1 a training run that stopped early.
"""
from __future__ import annotations

import argparse
import os
import sys

from megawan.config import ParallelConfig, config_to_dict, dit_preset, load_config, preset_names
from megawan.utils.user_errors import UserError, run_main

# The other subcommands import their modules when they run: those pull in torch and megatron-core (seconds),
# which `megawan --help` and `megawan presets` should not wait for.


def _check_out_folder(path: str) -> None:
    """The demo writes into a new or empty folder only: a non-empty one (another run, the user's data) is refused,
    rather than mixed with the demo's files or overwritten. A finished or killed demo is rerun into a new folder."""
    if os.path.isdir(path) and os.listdir(path):
        raise UserError(f"--out {path}: the folder exists and is not empty; the demo writes into a new or empty "
                        "folder (choose another --out, or remove this one)")
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"--out {path}: is a file, not a folder")


def _cmd_demo(args) -> int:
    if args.base and args.task != "lora":
        raise UserError("--base: only --task lora fine-tunes a finished demo")
    args.out = args.out or {"t2v": "runs/demo", "i2v": "runs/i2v", "lora": "runs/lora"}[args.task]
    _check_out_folder(args.out)
    if args.task == "i2v":
        from megawan.demo.i2v_task import I2V_STEPS, run_i2v_task  # lazy: torch and megatron-core

        run_i2v_task(args.out, steps=args.steps or I2V_STEPS)
        return 0
    if args.task == "lora":
        from megawan.demo.lora_task import LORA_STEPS, run_lora_task  # lazy: torch and megatron-core

        run_lora_task(args.out, base=args.base, steps=args.steps or LORA_STEPS)
        return 0
    from megawan.demo.runner import DEMO_STEPS, run_demo

    run_demo(args.out, steps=args.steps or DEMO_STEPS, nproc=args.nproc)
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
    from megawan.convert.dit_keys import dit_param_count  # lazy: megawan.convert imports torch

    return dit_param_count(config)


def _cmd_flops(args) -> int:
    c = dit_preset(args.preset)  # a misspelt preset is refused before the slow imports
    from megawan.models.dit import flops  # lazy: torch and megatron-core
    from megawan.models.dit.flops import latent_size, tokens

    if args.latent:
        size, what = (args.frames, args.height, args.width), "latent"
    else:  # video frames / pixels, as generate and plan_parallel.py take them; the VAE's strides give the latents
        size = latent_size(c, args.frames, args.height, args.width)
        what = f"{args.frames} frames {args.height}x{args.width} -> latent"
    f = flops(c, args.batch, *size)
    print(f"{args.preset}: {what} {size[0]}x{size[1]}x{size[2]}, {tokens(c, *size):,} tokens per sample; "
          f"forward {f / 1e12:.2f} TFLOP, training step (3x) {3 * f / 1e12:.2f} TFLOP for batch {args.batch}")
    return 0


def _cmd_train(args) -> int:
    # ConfigError / TrainingError / CheckpointError are user errors: main() prints them as one line
    overrides = tuple(args.overrides) + ((f"checkpoint.init_from={args.init_from}",) if args.init_from else ())
    cfg = load_config(args.config, overrides)  # a missing file or a bad override is refused before the slow imports
    if args.print_config:
        import yaml

        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
        return 0
    from megawan.training.trainer import train  # lazy: torch and megatron-core

    result = train(args.config, overrides)
    return 0 if result["stopped"] is None or result["stopped"].startswith("signal") else 1


def _cmd_train_vae(args) -> int:
    from megawan.config.vae_run import load_vae_config, vae_run_config_dict

    cfg = load_vae_config(args.config, tuple(args.overrides))  # refused before the slow imports
    if args.print_config:
        import yaml

        print(yaml.safe_dump(vae_run_config_dict(cfg), sort_keys=False), end="")
        return 0
    from megawan.training.vae_trainer import train_vae  # lazy: torch and megatron-core

    result = train_vae(args.config, tuple(args.overrides))
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


def _cmd_eval(args) -> int:
    from megawan.capabilities import cuda_available
    from megawan.evaluation.runner import EvalOptions, evaluate  # lazy: torch and megatron-core

    if args.device == "cuda" and not cuda_available():
        raise UserError("--device cuda: this machine has no CUDA device (use --device cpu or auto)")
    opts = EvalOptions(out=args.out, ckpt=args.ckpt, encoders=args.encoders, suite=args.suite,
                       suite_size=args.suite_size, prompts=args.prompts, reference=args.reference, i3d=args.i3d,
                       vaes=tuple(args.vae), vae_clips=args.vae_clips, vae_buckets=tuple(args.vae_buckets or ()),
                       lpips_vgg=args.lpips_vgg, lpips_lin=args.lpips_lin, label=args.label, frames=args.frames,
                       height=args.height, width=args.width, steps=args.steps, shift=args.shift,
                       guidance=args.guidance, seed=args.seed, device=args.device)
    results = evaluate(opts)
    if results is not None:
        from megawan.evaluation.results import TABLE

        with open(os.path.join(args.out, TABLE), encoding="utf-8") as f:
            print(f.read(), end="")
    return 0


def _add_eval(sub) -> None:
    ev = sub.add_parser("eval", help="generate from a checkpoint for a prompt set and score it: the synthetic suite's "
                                     "colour / shape / direction accuracy, FVD against reference videos, VAE "
                                     "reconstruction; one row per run in OUT/results.jsonl and OUT/results.md")
    ev.add_argument("--ckpt", help="training checkpoint (or run checkpoint dir), or a megawan pipeline")
    ev.add_argument("--encoders", help="folder with the VAE, umT5 and tokenizer (a pipeline carries its own)")
    ev.add_argument("--suite", choices=("synthetic",), help="the prompt set: the synthetic suite (the default "
                                                            "without --prompts)")
    ev.add_argument("--suite-size", type=int, default=12, help="prompts of the synthetic suite")
    ev.add_argument("--prompts", help="a file with one prompt per line instead of the suite")
    ev.add_argument("--reference", help="FVD: reference videos, a folder or a manifest (.jsonl / .csv)")
    ev.add_argument("--i3d", help="FVD: the I3D weights in the pytorch-i3d layout (rgb_imagenet.pt)")
    ev.add_argument("--vae", action="append", default=[], metavar="[LABEL=]PATH",
                    help="a VAE to score on --vae-clips (repeatable; as tools/eval_vae.py takes them)")
    ev.add_argument("--vae-clips", help="held-out clips for the VAEs: a manifest (.jsonl / .csv)")
    ev.add_argument("--vae-buckets", nargs="+", metavar="FxHxW", help="sizes the VAE clips are cut to (default: "
                                                                       "the generated videos' size)")
    ev.add_argument("--lpips-vgg", help="LPIPS: torchvision's vgg16-397923af.pth")
    ev.add_argument("--lpips-lin", help="LPIPS: the LPIPS repo's weights/v0.1/vgg.pth")
    ev.add_argument("--out", required=True, help="results folder: OUT/LABEL/ per run, OUT/results.jsonl, "
                                                 "OUT/results.md")
    ev.add_argument("--label", help="the run's name in the table (default: from --ckpt's path)")
    for field in ("frames", "height", "width", "steps"):
        ev.add_argument(f"--{field}", type=int, help=f"sampling {field} (default: the model's official)")
    ev.add_argument("--shift", type=float, help="timestep shift (default: the model's official)")
    ev.add_argument("--guidance", type=float, help="guidance scale (default: the model's official)")
    ev.add_argument("--seed", type=int, default=0, help="noise seed; prompt i uses seed + i")
    ev.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                    help="where the models run: auto = cuda where CUDA is, else cpu")
    # generation's checks raise plain ValueErrors naming the option; the I3D file's check names file and key
    ev.set_defaults(func=_cmd_eval, user_errors=(ValueError,))


def _cmd_env(args) -> int:
    from megawan.env_report import report

    print(report())
    return 0


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each flag's default, except where there is none to show (unset, off, or said in the text)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, False, [], argparse.SUPPRESS) or "default" in text:
            return text
        return super()._get_help_string(action)


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
    srv.add_argument("--port", type=int, default=7860, help="port of the page (http://HOST:PORT)")
    srv.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                     help="where the DiT, umT5 and VAE run: auto = cuda where CUDA is, else cpu")
    srv.add_argument("--out", default="outputs/serve", help="folder the videos are written to")
    for field in ("frames", "height", "width", "steps"):
        srv.add_argument(f"--{field}", type=int, help=f"the page's starting {field} (default: the model's official)")
    # the checkpoint's checks raise plain ValueErrors naming the option, as generate's
    srv.set_defaults(func=_cmd_serve, user_errors=(ValueError,))


def build_parser() -> argparse.ArgumentParser:
    from megawan.env_report import megawan_version

    parser = argparse.ArgumentParser(prog="megawan", description="Train Wan-style video diffusion models.",
                                     formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"megawan {megawan_version()}",
                        help="print megawan's version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add = sub.add_parser

    def add_parser(name, **kwargs):  # every subcommand's --help says what it does and shows the defaults
        kwargs.setdefault("formatter_class", _HelpFormatter)
        kwargs.setdefault("description", kwargs.get("help"))
        return add(name, **kwargs)

    sub.add_parser = add_parser

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
    train.add_argument("--print-config", action="store_true",
                       help="print the resolved config (the file, presets and overrides applied) as YAML and exit")
    train.set_defaults(func=_cmd_train)

    tvae = sub.add_parser("train-vae", help="train a Wan-VAE under torchrun / srun: megawan train-vae --config FILE "
                                            "[key=value ...] (docs/vae_training.md)")
    tvae.add_argument("--config", help="VAE run config YAML (vae, init, data, loss, optimizer, train, checkpoint)")
    tvae.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. loss.gan=0.1")
    tvae.add_argument("--print-config", action="store_true",
                      help="print the resolved config (file, VAE preset and overrides applied) as YAML and exit")
    tvae.set_defaults(func=_cmd_train_vae)

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
    gen.add_argument("--height", type=int, help="video height in pixels (default: the model's official size)")
    gen.add_argument("--width", type=int, help="video width in pixels (default: the model's official size)")
    gen.add_argument("--steps", type=int, help="sampling steps (default: the model's official setting)")
    gen.add_argument("--sampler", default="unipc", choices=["unipc", "euler", "dpm++"], help="the ODE solver")
    gen.add_argument("--shift", type=float, help="timestep shift of the sampling grid (default: the model's official "
                                                    "setting)")
    gen.add_argument("--guidance", type=float, nargs="+", help="one scale, or LOW HIGH for the A14B experts")
    gen.add_argument("--seed", type=int, default=0, help="noise seed; prompt i uses seed + i")
    gen.add_argument("--fps", type=int, help="frames per second of the written video (default: the model's)")
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
    gen.add_argument("--tensor-parallel", type=int, default=1, help="ranks that split the weights (torchrun)")
    gen.add_argument("--context-parallel", type=int, help="default: world size / tensor parallel")
    gen.add_argument("--cp-mode", default="ulysses", choices=["ulysses", "ring"],
                     help="how context-parallel ranks share attention")
    # generation's checks raise plain ValueErrors naming the option (--frames, --low-noise-ckpt, ...)
    gen.set_defaults(func=_cmd_generate, user_errors=(ValueError,))

    _add_serve(sub)
    _add_eval(sub)

    presets = sub.add_parser("presets", help="list model presets and their hyper-parameters")
    presets.set_defaults(func=_cmd_presets)

    fl = sub.add_parser("flops", help="model FLOPs of a preset for a video size (frames, pixels)")
    fl.add_argument("preset", help="a model preset (megawan presets lists them)")
    fl.add_argument("--frames", type=int, required=True, help="video frames, 1 + 4k (81 -> 21 latent frames)")
    fl.add_argument("--height", type=int, required=True, help="video height in pixels (480 -> 60 latent rows with "
                                                               "Wan2.1's VAE)")
    fl.add_argument("--width", type=int, required=True, help="video width in pixels (832 -> 104)")
    fl.add_argument("--latent", action="store_true", help="--frames / --height / --width are latent sizes")
    fl.add_argument("--batch", type=int, default=1, help="samples per step")
    fl.set_defaults(func=_cmd_flops)

    env = sub.add_parser("env", help="versions of Python, torch, CUDA and the libraries megawan uses, the GPUs, and "
                                     "what backend: auto and MEGAWAN_KERNELS resolve to here")
    env.set_defaults(func=_cmd_env)
    return parser


def main(argv=None) -> int:
    """Exit status: 0 done, 2 a user error (one line on stderr; MEGAWAN_DEBUG=1 adds the traceback), 1 a training
    run that stopped early; a bug raises with its traceback."""
    args = build_parser().parse_args(argv)
    return run_main(f"megawan {args.command}", args.func, args, also=getattr(args, "user_errors", ()))


if __name__ == "__main__":
    sys.exit(main())
