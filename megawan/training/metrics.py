"""Metrics sinks on the logging rank: JSONL (always), TensorBoard (logging.tensorboard: auto | true | false) and
Weights & Biases (when logging.wandb_project is set).

    log = MetricsLogger.for_run(cfg, "runs/x/logs", enabled=rank == 0, step=resumed_step)
    print(log.summary)                                  # which trackers are on and where they write
    log.write(step, {"loss": 0.12, "lr": 1e-4, "bucket": "17x480x832"})   # numbers go to the trackers too
    log.log_media(step, videos=[("val/video/p0", "p0.mp4", "a red ball")], images=[("val/sheet", "s.png", None)])
    log.close()

A run resumed at step S (after a kill, a pre-emption, a torchrun restart) computes steps S+1, ... again: the
rows that the stopped run logged for them are dropped from metrics.jsonl when the logger opens, so the file
holds each step once, the one of the run that carried on; TensorBoard is told the same (SummaryWriter's
purge_step). W&B keeps the stopped run's values for those steps: it refuses a step below the newest it holds.

W&B's run id lives in a file of the checkpoint folder (`wandb_run_id`), written on the first start and read on
every later one: a requeued Slurm job, a torchrun restart or a resume by hand continues the same W&B run, even
when the folder is reached by another path (another mount point) or was moved; a fresh run in a fresh folder
gets a fresh id. (A hash of the folder's path would do neither.)

Videos go to TensorBoard as animated GIFs (what its image dashboard plays; torch's add_video would need
moviepy), the caption as the tag's display name and description; to W&B as the mp4 itself with its caption.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import secrets
import time

from megawan.config import ConfigError, config_to_dict
from megawan.utils.images import enlarge_frames
from megawan.utils.media import read_media

logger = logging.getLogger("megawan")

WANDB_ID_FILE = "wandb_run_id"
# TensorBoard holds every picture in its event file: big clips (GIFs) and sheets are shrunk for it
TB_VIDEO_MAX_SIDE, TB_IMAGE_MAX_SIDE = 512, 2048


class MetricsLogger:
    """directory: where metrics.jsonl, tensorboard/ and wandb/ go. tensorboard: True | False | "auto".
    wandb_project (+ wandb_entity, wandb_run_name): log to W&B as well; the run id is kept in
    <run_folder>/wandb_run_id (run_folder: the checkpoint folder; default `directory`). enabled: False on every
    rank but the logging one (all calls then do nothing). step: the step the run resumes from."""

    def __init__(self, directory: str, tensorboard="auto", wandb_project: str | None = None,
                 config: dict | None = None, enabled: bool = True, step: int = 0, *,
                 wandb_entity: str | None = None, wandb_run_name: str | None = None, run_folder: str | None = None):
        self.enabled = enabled
        self.tb = self.wandb = None
        self.summary = ""
        if not enabled:
            return
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, "metrics.jsonl")
        _drop_rows_after(self.path, step)
        self.file = open(self.path, "a", encoding="utf-8")
        said = [f"metrics {self.path}"]
        if tensorboard is True or tensorboard == "auto":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                if tensorboard is True:  # the config check refuses this before any rank starts
                    raise
            else:
                self.tb_dir = os.path.join(directory, "tensorboard")
                # a resumed run: TensorBoard hides what the stopped run logged after `step` (a SessionLog START at
                # step + 1 in the new event file), as metrics.jsonl drops those rows
                self.tb = SummaryWriter(self.tb_dir, purge_step=step + 1 if step else None)
                said.append(f"TensorBoard {self.tb_dir} (tensorboard --logdir {self.tb_dir})")
        if wandb_project:
            import wandb  # the config check refuses wandb_project without wandb before any rank starts

            try:
                self.wandb = wandb.init(project=wandb_project, entity=wandb_entity, name=wandb_run_name,
                                        id=wandb_run_id(run_folder or directory), resume="allow",
                                        config=config or {}, dir=directory)
            except wandb.errors.Error as e:  # not logged in, no network, a project of another entity, ...
                raise ConfigError(f"logging.wandb_project: W&B did not start ({' '.join(str(e).split())}); "
                                  "`wandb login`, or WANDB_MODE=offline to log now and `wandb sync` later") from None
            where = "offline, `wandb sync` uploads it later" if self.wandb.settings.mode == "offline" else \
                self.wandb.url
            said.append(f"W&B run {self.wandb.id} of {wandb_project} ({where}; files {self.wandb.dir})")
        self.summary = "trackers: " + "; ".join(said)

    @classmethod
    def for_run(cls, cfg, directory: str, enabled: bool, step: int, as_dict=config_to_dict) -> "MetricsLogger":
        """The logger of a training run: its `logging` section, the W&B id kept in its checkpoint folder
        (as_dict: the run config as W&B records it)."""
        log = cfg.logging
        return cls(directory, log.tensorboard_on() if enabled else False, log.wandb_project,
                   as_dict(cfg) if enabled else None, enabled=enabled, step=step,
                   wandb_entity=log.wandb_entity, wandb_run_name=log.wandb_run_name, run_folder=cfg.checkpoint.dir)

    def write(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": time.time(), **{k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                                      for k, v in values.items()}}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        # the trackers take numbers only: the bucket's name, a grad norm of a skipped step (None) stay in the JSONL
        numeric = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                   and math.isfinite(v)}
        if self.tb is not None:
            for k, v in numeric.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(numeric, step=step)

    def log_media(self, step: int, videos=(), images=()) -> None:
        """Files to the trackers (metrics.jsonl does not hold pictures: the files themselves stay where they are).

        videos: (tag, mp4 path, caption) per clip; images: (tag, image path, caption or None) per picture."""
        if not self.enabled or (self.tb is None and self.wandb is None):
            return
        if self.tb is not None:
            for tag, path, caption in videos:
                self._tb_picture(tag, read_media(path), step, caption, TB_VIDEO_MAX_SIDE, fps=_fps(path))
            for tag, path, caption in images:
                self._tb_picture(tag, read_media(path), step, caption, TB_IMAGE_MAX_SIDE)
            self.tb.flush()
        if self.wandb is not None:
            import wandb

            media = {tag: wandb.Video(path, caption=caption, format="mp4") for tag, path, caption in videos}
            media.update({tag: wandb.Image(path, caption=caption) for tag, path, caption in images})
            self.wandb.log(media, step=step)

    def _tb_picture(self, tag: str, frames, step: int, caption: str | None, max_side: int, fps: float = 16.0) -> None:
        """One picture (one frame: PNG) or clip (animated GIF) as a TensorBoard image summary; the caption is
        the tag's display name and description (the image dashboard shows both)."""
        from PIL import Image
        from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata

        frames = enlarge_frames(frames, max_side=max_side)
        pictures = [Image.fromarray(f) for f in frames]
        buffer = io.BytesIO()
        if len(pictures) == 1:
            pictures[0].save(buffer, format="PNG")
        else:
            pictures[0].save(buffer, format="GIF", save_all=True, append_images=pictures[1:], loop=0,
                             duration=round(1000 / fps))
        height, width = frames.shape[1:3]
        image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=buffer.getvalue())
        metadata = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name="images"),
                                   display_name=caption or "", summary_description=caption or "")
        # SummaryWriter.add_image takes frames, not encoded bytes with a caption: the summary goes to its file
        # writer as add_image's would
        self.tb._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image, metadata=metadata)]),
                                               step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def wandb_run_id(folder: str) -> str:
    """The W&B run id of the run whose checkpoints go to `folder`: read from <folder>/wandb_run_id, or made (12
    random hex digits) and written there on the first start (atomically: a kill leaves no half id)."""
    path = os.path.join(folder, WANDB_ID_FILE)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            run_id = f.read().strip()
        if run_id:
            return run_id
    run_id = secrets.token_hex(6)
    os.makedirs(folder, exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(run_id + "\n")
    os.replace(path + ".tmp", path)
    return run_id


def _fps(path: str) -> float:
    import av

    with av.open(path) as container:
        rate = container.streams.video[0].average_rate
    return float(rate) if rate else 16.0


def read_metrics(path: str) -> list:
    """The rows of a metrics.jsonl. A last line without its newline is one being written now (or cut by a
    kill mid-write): it is not a row yet."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.endswith("\n") and line.strip()]


def _drop_rows_after(path: str, step: int) -> None:
    """Keep the rows of steps <= `step` (the ones the resumed run does not compute again). The file is replaced
    whole (a new file renamed over it), so a kill here leaves either the old rows or the kept ones."""
    if not os.path.exists(path):
        return
    kept = read_metrics(path)
    kept = [r for r in kept if r.get("step", 0) <= step]
    with open(path, encoding="utf-8") as f:
        if sum(1 for _ in f) == len(kept):
            return  # nothing to drop (a fresh or cleanly stopped run): no rewrite
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
    os.replace(tmp, path)
    logger.info("%s: dropped the rows of steps after %d, which this run computes again", path, step)
