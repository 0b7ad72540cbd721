"""A web page for generation: `megawan serve --ckpt DIR`. One process, one rank, the same sampling as
`megawan generate` (megawan.generation): a prompt, a negative prompt, the first frame for image-to-video models
(the last one too for FLF2V), seed, steps, guidance, frames and size with the model's official defaults, a
Generate button, the video and the settings it was sampled with.

    megawan serve --ckpt runs/demo/checkpoints --encoders runs/demo/data/encoders --device cpu
    # then open http://127.0.0.1:7860

The checkpoint and encoders are checked at start; the first Generate loads the models, which stay loaded
(`generate(req, kept)`), so later clicks only sample. One request samples at a time (gradio's queue): the
process group and the models are this process's, shared by every visitor. Each video is written to --out
(default outputs/serve) and stays there. gradio is an optional dependency: `pip install megawan[serve]`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Optional

from megawan.utils.user_errors import UserError

SERVE_EXTRA = "pip install megawan[serve]"


@dataclasses.dataclass
class ServeOptions:
    ckpt: str  # a training checkpoint (or a run's checkpoint dir), or a converted megawan pipeline
    encoders: Optional[str] = None  # the VAE, umT5 and tokenizer folder (a pipeline carries its own)
    low_noise_ckpt: Optional[str] = None  # A14B from two training runs: the low-noise expert's checkpoint
    host: str = "127.0.0.1"  # 0.0.0.0 serves other machines too
    port: int = 7860
    device: str = "auto"  # auto | cpu | cuda, as megawan generate's --device
    out: str = "outputs/serve"  # where every video is written
    frames: Optional[int] = None  # the page's starting values (default: the model's official settings)
    height: Optional[int] = None
    width: Optional[int] = None
    steps: Optional[int] = None


def import_gradio():
    """gradio, or a one-line error naming the extra that installs it."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no telemetry calls from a training machine
    try:
        import gradio
    except ImportError as e:
        raise UserError(f"the web page needs gradio: {SERVE_EXTRA} ({e})") from None
    return gradio


class Session:
    """The model behind the page: what the checkpoint is (config, official defaults), and the models kept loaded
    between requests. Building it reads only the checkpoint's and encoders' metadata; run() needs the process
    group (megawan.parallel.initialize)."""

    def __init__(self, opts: ServeOptions):
        from megawan.artifacts import find_encoders, resolve_model
        from megawan.diffusion.defaults import official_defaults

        self.opts = opts
        found = resolve_model(opts.ckpt, opts.low_noise_ckpt)
        self.cfg = found["config"]
        if opts.encoders is None and found["encoders"] is None:
            raise UserError("no encoders: pass --encoders FOLDER (the VAE, umT5 weights and tokenizer)")
        find_encoders(opts.encoders or found["encoders"])  # a missing VAE / umT5 / tokenizer is named now
        self.null_text = found["null_text"]
        self.defaults = official_defaults(self.cfg.name, self.cfg.model_type, self.cfg.expert_boundary)
        self.out = os.path.abspath(opts.out)
        os.makedirs(self.out, exist_ok=True)
        self.kept: dict = {}  # megawan.generation's loaded models, filled by the first request
        self.count = 0

    @property
    def image_input(self) -> str:
        """none | optional (TI2V: text or image to video) | required (I2V)."""
        return {"t2v": "none", "ti2v": "optional"}.get(self.cfg.model_type, "required")

    @property
    def last_image_input(self) -> bool:
        return self.cfg.image_pos_len is not None  # Wan2.1 FLF2V-14B: first and last frame

    @property
    def two_experts(self) -> bool:
        return self.cfg.expert_boundary is not None

    def start_values(self) -> dict:
        """The page's starting field values: --frames / --height / --width / --steps, else the official ones;
        image-to-video leaves the size blank (the video then takes the image's aspect ratio)."""
        o, d = self.opts, self.defaults
        sized_by_image = self.image_input != "none"
        guidance = d["guidance"] if isinstance(d["guidance"], (tuple, list)) else (d["guidance"], d["guidance"])
        return dict(frames=o.frames or d["frames"], steps=o.steps or d["steps"], guidance=guidance[0],
                    guidance_high=guidance[1], height=o.height or (None if sized_by_image else d["height"]),
                    width=o.width or (None if sized_by_image else d["width"]))

    def request(self, prompt, negative, image, last_image, seed, steps, guidance, guidance_high, frames, height,
                width):
        """The GenerationRequest for the page's fields (blank fields: the official defaults)."""
        from megawan.generation import GenerationRequest, slug

        if not (prompt or "").strip():
            raise ValueError("prompt: write what the video shows")
        name = self.cfg.name
        if self.image_input == "required" and not image:  # in the page's words, not generate's --image
            raise ValueError(f"first frame: {name} is an image-to-video model, upload the video's first frame")
        if self.last_image_input and image and not last_image:
            raise ValueError(f"last frame: {name} is a first-last-frame model, upload the video's last frame too")
        if self.image_input == "none":
            image = last_image = None
        if not self.last_image_input:
            last_image = None
        if guidance is not None and self.two_experts:
            guidance = (float(guidance), float(guidance_high if guidance_high is not None else guidance))
        self.count += 1
        file = f"{time.strftime('%Y%m%d-%H%M%S')}_{self.count:03d}_{slug(prompt)[:40]}.mp4"
        o = self.opts
        return GenerationRequest(
            ckpt=o.ckpt, encoders=o.encoders, low_noise_ckpt=o.low_noise_ckpt, prompts=[prompt.strip()],
            out=os.path.join(self.out, file), negative_prompt=(negative or "").strip() or None,
            frames=_int(frames), height=_int(height), width=_int(width), steps=_int(steps), guidance=guidance,
            seed=_int(seed) or 0, image=image or None, last_image=last_image or None, device=o.device,
            progress=False)

    def run(self, *fields) -> tuple:
        """(the written video or None, the written image or None (one frame), the settings it was sampled with)."""
        from megawan.generation import generate, prepare

        req = self.request(*fields)
        plan = prepare(req)  # a request the model cannot take is a ValueError naming the field, before sampling
        start = time.time()
        (path,) = generate(req, self.kept)
        negative = req.negative_prompt
        if negative is None:
            negative = "(zero text states: trained with text dropout)" if self.null_text else self.defaults[
                "negative_prompt"]
        settings = {"prompt": req.prompts[0], "negative_prompt": negative, "seed": req.seed, "steps": plan["steps"],
                    "sampler": req.sampler, "shift": plan["shift"], "guidance": plan["guidance"],
                    "frames": plan["frames"], "height": plan["height"], "width": plan["width"], "fps": plan["fps"],
                    "image": req.image, "last_image": req.last_image, "note": plan["note"],
                    "checkpoint": req.ckpt, "model": self.cfg.name, "device": req.device, "output": path,
                    "seconds": round(time.time() - start, 2)}
        is_video = path.lower().endswith(".mp4")
        return (path if is_video else None), (None if is_video else path), settings


def _int(value) -> Optional[int]:
    return None if value is None or value == "" else int(value)


def build_page(session: Session):
    """The gradio Blocks page over `session`."""
    gr = import_gradio()
    cfg, start = session.cfg, session.start_values()
    with gr.Blocks(title=f"megawan: {cfg.name}") as page:
        gr.Markdown(f"## megawan · {cfg.name} ({cfg.model_type}{', two experts' if session.two_experts else ''})\n"
                    f"Checkpoint `{session.opts.ckpt}`; videos are written to `{session.out}`.")
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(label="Prompt", lines=3, elem_id="prompt")
                negative = gr.Textbox(
                    label="Negative prompt", lines=2, elem_id="negative_prompt",
                    placeholder="blank: the zero null condition this model was trained with" if session.null_text
                    else "blank: Wan's default negative prompt")
                image = gr.Image(label="First frame" + (" (optional: blank samples text-to-video)"
                                                        if session.image_input == "optional" else ""),
                                 type="filepath", visible=session.image_input != "none", elem_id="first_frame")
                last_image = gr.Image(label="Last frame", type="filepath", visible=session.last_image_input,
                                      elem_id="last_frame")
                with gr.Row():
                    seed = gr.Number(label="Seed", value=0, precision=0, elem_id="seed")
                    steps = gr.Number(label="Steps", value=start["steps"], precision=0, minimum=1, elem_id="steps")
                    guidance = gr.Number(label="Guidance" + (" (low-noise expert)" if session.two_experts else ""),
                                         value=start["guidance"], elem_id="guidance")
                    guidance_high = gr.Number(label="Guidance (high-noise expert)", value=start["guidance_high"],
                                              visible=session.two_experts, elem_id="guidance_high")
                with gr.Row():
                    frames = gr.Number(label="Frames (1 + 4k)", value=start["frames"], precision=0, minimum=1,
                                       elem_id="frames")
                    blank = " (blank: the image's aspect ratio)" if session.image_input != "none" else ""
                    height = gr.Number(label="Height" + blank, value=start["height"], precision=0, elem_id="height")
                    width = gr.Number(label="Width" + blank, value=start["width"], precision=0, elem_id="width")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column():
                video = gr.Video(label="Video", elem_id="result", interactive=False)
                still = gr.Image(label="Image (one frame)", elem_id="result_image", interactive=False)
                settings = gr.JSON(label="Settings", elem_id="settings")

        def run(*fields):
            try:
                return session.run(*fields)
            except (ValueError, UserError) as e:  # the request's mistake, shown on the page (one line)
                raise gr.Error(" ".join(str(e).split())) from None

        button.click(run, inputs=[prompt, negative, image, last_image, seed, steps, guidance, guidance_high, frames,
                                  height, width], outputs=[video, still, settings], concurrency_limit=1)
    return page


def serve(opts: ServeOptions, block: bool = True):
    """Check the checkpoint, start the one-rank process group and serve the page (until interrupted when
    `block`; else return the launched page)."""
    import_gradio()  # missing gradio is named before the slow imports
    from megawan.capabilities import cuda_available
    from megawan.config import ParallelConfig
    from megawan.parallel import initialize

    if opts.device == "cuda" and not cuda_available():
        raise UserError("--device cuda: this machine has no CUDA device (use --device cpu or auto)")
    session = Session(opts)  # a missing or damaged checkpoint, missing encoders: named before the process group
    # gloo for --device cpu (also on a GPU machine), else NCCL where CUDA is: as `megawan generate` starts it
    initialize(ParallelConfig(), backend="gloo" if opts.device == "cpu" else None)
    page = build_page(session)
    print(f"[serve] {session.cfg.name} from {opts.ckpt} on {opts.device}; the models load on the first Generate "
          f"and stay loaded; videos go to {session.out}", flush=True)
    page.queue(default_concurrency_limit=1)
    try:
        page.launch(server_name=opts.host, server_port=opts.port, allowed_paths=[session.out], show_error=True,
                    prevent_thread_lock=not block)
    except OSError as e:  # gradio: "Cannot find empty port in range: 7860-7860. ..."
        raise UserError(f"--port {opts.port}: cannot listen on {opts.host}:{opts.port} (in use? pick another "
                        f"--port): {str(e).split('.')[0]}") from None
    return page
