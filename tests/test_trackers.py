"""What a run shows its people: TensorBoard events (scalars, each held-out prompt's clip with its caption, the
contact sheet) read back with TensorBoard's own reader; a W&B run that a requeued job continues (offline);
the captioned contact sheet with enlarged frames; the animated preview beside each mp4; the config check of
logging.tensorboard. No training: validation's files are written here as its leaders write them."""

import glob
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from megawan.config import ConfigError, load_config
from megawan.training.metrics import WANDB_ID_FILE, MetricsLogger
from megawan.training.validation import STRIP_MIN_HEIGHT, media_of, merge_samples, read_samples
from megawan.utils.images import contact_sheet
from megawan.utils.media import write_media, write_video

CAPTIONS = {"held_out_clip_00000": "a red circle moves right", "held_out_clip_00001": "a blue square moves down"}


def _clip(seed: int, frames: int = 5) -> np.ndarray:
    """A 32 x 48 clip: a bright block moving over a dark background (uint8 [T, H, W, 3])."""
    video = np.full((frames, 32, 48, 3), 20, dtype=np.uint8)
    for t in range(frames):
        video[t, 8:24, 4 + 6 * t:16 + 6 * t] = (200, 40 + 100 * seed, 40)
    return video


@pytest.fixture
def validation_step(tmp_path):
    """A validation step folder as two leaders leave it (clip, preview, strip, their rows), merged by rank 0."""
    folder = tmp_path / "validation" / "step-0000010"
    folder.mkdir(parents=True)
    for rank, (sample_id, caption) in enumerate(CAPTIONS.items()):
        frames = _clip(rank)
        write_media(str(folder / f"{sample_id}.mp4"), frames, fps=8)
        contact_sheet(frames, max_frames=8, gap=2, min_height=STRIP_MIN_HEIGHT).save(folder / f"{sample_id}.strip.png")
        row = {"id": sample_id, "caption": caption, "video": f"{sample_id}.mp4", "preview": f"{sample_id}.webp",
               "strip": f"{sample_id}.strip.png"}
        (folder / f"samples-rank{rank:05d}.jsonl").write_text(json.dumps(row) + "\n")
    merge_samples(str(folder))
    return folder


def test_contact_sheet_has_each_caption_left_of_its_enlarged_frames(validation_step):
    sheet = np.asarray(Image.open(validation_step / "contact_sheet.png").convert("RGB"))
    strip = Image.open(validation_step / "held_out_clip_00000.strip.png")
    assert strip.size == (5 * 192 + 4 * 2, 128)  # 32 x 48 frames shown 4x (nearest neighbour), 2 px apart
    assert sheet.shape[1] == 240 + strip.width and sheet.shape[0] >= 2 * 128  # caption column + strip, two rows
    captions = sheet[:, :240]
    for top in (0, sheet.shape[0] - 128):  # each row's caption column holds light (text) pixels
        assert (captions[top:top + 128].min(axis=-1) > 200).sum() > 50
    assert (captions.min(axis=-1) > 200).sum() < 0.2 * captions[..., 0].size  # text on a dark ground
    # the strip is in the sheet unchanged, right of its caption
    assert np.array_equal(sheet[:128, 240:], np.asarray(strip.convert("RGB")))
    assert [r["caption"] for r in read_samples(str(validation_step))] == list(CAPTIONS.values())


def test_write_media_puts_an_animated_preview_beside_the_mp4_only(tmp_path):
    frames = _clip(0, frames=6)
    write_media(str(tmp_path / "clip.mp4"), frames, fps=8)
    write_media(str(tmp_path / "still.png"), frames[:1])
    write_video(str(tmp_path / "data.mp4"), frames)  # training data: the one file asked for
    assert sorted(os.listdir(tmp_path)) == ["clip.mp4", "clip.webp", "data.mp4", "still.png"]
    with Image.open(tmp_path / "clip.webp") as preview:
        assert preview.format == "WEBP" and preview.is_animated and preview.n_frames == 6
        assert preview.size == (192, 128)  # enlarged 4x
        preview.seek(3)
        shown = np.asarray(preview.convert("RGB"))[::4, ::4]
    assert np.abs(shown.astype(int) - frames[3]).mean() < 8  # lossy, but the same picture


def test_tensorboard_events_hold_the_scalars_clips_and_contact_sheet(validation_step, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = tmp_path / "logs"
    log = MetricsLogger(str(logs), tensorboard="auto", step=0)
    assert "TensorBoard" in log.summary and str(logs / "tensorboard") in log.summary
    log.write(5, {"loss": 0.5, "lr": 1e-3, "grad_norm": None, "bucket": "5x32x48", "tokens_per_s": 100.0})
    log.write(10, {"loss": 0.25, "lr": 2e-3, "grad_norm": float("nan"), "bucket": "5x32x48"})
    log.write(10, {"val/loss": 0.3, "val/samples": 2})
    log.log_media(10, **media_of(str(validation_step)))
    log.close()

    events = EventAccumulator(str(logs / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert set(tags["scalars"]) == {"loss", "lr", "tokens_per_s", "val/loss", "val/samples"}  # numbers only
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(5, 0.5), (10, 0.25)]
    assert set(tags["images"]) == {"val/video/held_out_clip_00000", "val/video/held_out_clip_00001",
                                   "val/contact_sheet"}
    for sample_id, caption in CAPTIONS.items():
        tag = f"val/video/{sample_id}"
        (clip,) = events.Images(tag)
        assert clip.step == 10 and (clip.width, clip.height) == (192, 128)
        assert events.SummaryMetadata(tag).display_name == caption  # the image dashboard's title of the clip
        with Image.open(io.BytesIO(clip.encoded_image_string)) as gif:
            assert gif.format == "GIF" and gif.n_frames == 5
    (sheet,) = events.Images("val/contact_sheet")
    on_disk = Image.open(validation_step / "contact_sheet.png")
    assert sheet.encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n" and (sheet.width, sheet.height) == on_disk.size
    rows = [json.loads(line) for line in open(logs / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [5, 10, 10] and rows[1]["grad_norm"] is None

    resumed = MetricsLogger(str(logs), tensorboard=True, step=5)  # killed after step 10, resumed from step 5
    resumed.write(10, {"loss": 0.125})
    resumed.close()
    events = EventAccumulator(str(logs / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()  # TensorBoard, like metrics.jsonl, holds the resumed run's step 10 only
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(5, 0.5), (10, 0.125)]
    assert [r["step"] for r in map(json.loads, open(logs / "metrics.jsonl"))] == [5, 10]


def test_wandb_run_id_is_kept_in_the_checkpoint_folder_across_a_requeue(tmp_path, monkeypatch, validation_step):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    ckpt = tmp_path / "checkpoints"
    ids = []
    for start, step in enumerate((10, 20)):  # the first job, then its requeue resuming from step 10
        log = MetricsLogger(str(ckpt / "logs"), tensorboard=False, wandb_project="megawan-test", config={"seed": 0},
                            step=10 * start, run_folder=str(ckpt), wandb_run_name="tiny")
        assert "W&B run" in log.summary and "offline" in log.summary
        log.write(step, {"loss": 1.0 / step, "bucket": "5x32x48"})
        if start == 0:
            log.log_media(step, **media_of(str(validation_step)))
        ids.append(log.wandb.id)
        log.close()
    assert ids[0] == ids[1] == (ckpt / WANDB_ID_FILE).read_text().strip()
    runs = sorted(glob.glob(str(ckpt / "logs" / "wandb" / f"offline-run-*-{ids[0]}")))
    assert len(runs) == 2  # both starts wrote to the same run id
    media = glob.glob(os.path.join(runs[0], "files", "media", "**", "*.*"), recursive=True)
    assert any(m.endswith(".mp4") for m in media) and any(m.endswith(".png") for m in media), media


def test_logging_tensorboard_is_auto_true_or_false(monkeypatch):
    import megawan.config.run as run

    assert load_config().logging.tensorboard == "auto"
    assert load_config(overrides=("logging.tensorboard=false",)).logging.tensorboard_on() is False
    with pytest.raises(ConfigError, match=r"^logging.tensorboard: 'maybe' is not auto \| true \| false"):
        load_config(overrides=("logging.tensorboard=maybe",))
    monkeypatch.setattr(run, "tensorboard_installed", lambda: False)
    assert load_config().logging.tensorboard_on() is False  # auto without tensorboard: off, no error
    with pytest.raises(ConfigError, match=r"^logging.tensorboard: .*pip install megawan\[logging\]"):
        load_config(overrides=("logging.tensorboard=true",))
    monkeypatch.setattr(run, "wandb_installed", lambda: False)
    with pytest.raises(ConfigError, match=r"^logging.wandb_project: .*pip install megawan\[wandb\]"):
        load_config(overrides=("logging.wandb_project=video",))

