"""Buckets: parsing, nearest-aspect assignment, and resize + centre crop."""

import numpy as np
import pytest

from megawan.data.buckets import (Bucket, assign_bucket, cover_crop, parse_buckets, resize_center_crop,
                                   stage_buckets)


def test_stage_sets_fit_the_latent_grid():
    for name in ("image-256", "video-192", "image-480", "video-480", "video-720"):
        assert stage_buckets(name)
    with pytest.raises(ValueError, match="multiples of 16"):
        parse_buckets(["81x100x200"])
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        parse_buckets(["80x256x256"])
    with pytest.raises(ValueError, match="unknown bucket set"):
        stage_buckets("video-999")


def test_assignment_by_aspect_then_length():
    buckets = parse_buckets(["1x256x256", "1x192x336", "33x480x832", "81x480x832", "81x832x480", "81x480x480"])
    assert assign_bucket(buckets, 1, 720, 1280) == Bucket(1, 192, 336)       # a wide image
    assert assign_bucket(buckets, 1, 500, 520) == Bucket(1, 256, 256)        # a square-ish image
    assert assign_bucket(buckets, 200, 1080, 1920) == Bucket(81, 480, 832)   # a long wide video
    assert assign_bucket(buckets, 50, 1080, 1920) == Bucket(33, 480, 832)    # too short for 81 frames
    assert assign_bucket(buckets, 120, 1920, 1080) == Bucket(81, 832, 480)   # portrait
    assert assign_bucket(buckets, 20, 1080, 1920) is None                    # shorter than every video bucket


def test_resize_center_crop_keeps_the_centre():
    frames = np.zeros((3, 90, 160, 3), dtype=np.uint8)
    frames[:, 40:50, 75:85] = 255  # a white square in the middle
    out = resize_center_crop(frames, 48, 48)
    assert out.shape == (3, 3, 48, 48) and out.min() >= -1 and out.max() <= 1
    brightness = out[:, 0].mean(0)  # [48, 48]
    row, col = divmod(int(brightness.argmax()), 48)
    assert 21 <= row <= 27 and 21 <= col <= 27  # still in the middle after scaling 90x160 -> 48x85 and cropping
    assert brightness[row, col] > 0.5 and out[:, :, :8, :8].mean() < -0.9


@pytest.mark.parametrize("source,target,resized,top,left", [
    ((1080, 1920), (480, 832), (480, 853), 0, 10),  # 16:9 into 480x832: width has the slack
    ((64, 64), (32, 48), (48, 48), 8, 0),  # square into landscape: height has the slack
    ((30, 50), (48, 48), (48, 80), 0, 16),  # up-scaled
    ((37, 59), (32, 32), (32, 51), 0, 9),  # odd sizes: round(59 * 32 / 37) = 51
    ((64, 96), (32, 48), (32, 48), 0, 0),  # same aspect: no crop
])
def test_cover_crop_geometry(source, target, resized, top, left):
    """The one geometry of the CPU resize and of DALI's GPU resize: cover the target, keep the aspect, centre."""
    crop = cover_crop(*source, *target)
    assert (crop.resized, crop.top, crop.left, crop.height, crop.width) == (resized, top, left, *target)
    frames = np.random.default_rng(0).integers(0, 256, (2, *source, 3), dtype=np.uint8)
    assert resize_center_crop(frames, *target).shape == (3, 2, *target)
