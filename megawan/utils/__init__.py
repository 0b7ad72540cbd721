"""Small helpers shared by tools, the trainer, generation and tests: progress lines, frames as pictures
(images.py), frames to mp4 / png files and back (media.py)."""
