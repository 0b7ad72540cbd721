"""The tiny LoRA task (`megawan demo --task lora`): a LoRA fine-tune teaches the demo's pre-trained model a colour
word it never saw ("orange": neither the demo's data nor its tokenizer has it).

The base is the session's demo run (tests/conftest.py `demo_run`: a model of the six COLORS). The task
fine-tunes rank-8 adapters on every block linear with `megawan train` (a `lora:` section, checkpoint.init_from:
the demo's checkpoint) on one CPU rank, on orange clips of 8 of the 12 shape / direction combinations and a few
known-colour clips; its validation samples the held-out captions: orange on the other 4 combinations, and known
colours, at guidance 5. At least 90 % of the held-out orange prompts must come out orange (20 of 20 measured); the
base without the adapters far less often (10 of 20: it never learnt the word, a red / yellow blend can read as
orange), and the known colours at least half still as named (2 of 4: red and yellow drift to orange)."""

import json

from megawan.demo.lora_task import HELD_OUT, NEW_COLOR, run_lora_task, task_clips
from megawan.demo.shapes import COLORS, PALETTE, UNSEEN_COLORS, caption_color


def test_the_fine_tune_set_leaves_the_held_out_combinations_and_the_base_never_sees_orange():
    tune, held = task_clips()
    tuned = {(c.shape, c.direction) for c, _ in tune if c.color == NEW_COLOR}
    held_new = {(c.shape, c.direction) for c, _ in held if c.color == NEW_COLOR}
    assert held_new == set(HELD_OUT) and not tuned & held_new and len(tuned) == 12 - len(HELD_OUT)
    assert {c.color for c, _ in tune} == set(COLORS) | {NEW_COLOR}
    assert NEW_COLOR in UNSEEN_COLORS and NEW_COLOR not in COLORS  # the demo draws from COLORS only
    assert caption_color(f"a {NEW_COLOR} circle moves up") is None  # the demo's metric does not know the word
    assert caption_color(f"a {NEW_COLOR} circle moves up", PALETTE) == NEW_COLOR


def test_lora_fine_tune_teaches_the_demo_model_a_new_colour_word(tmp_path, demo_run):
    from megawan.checkpoint import is_lora_checkpoint, latest_checkpoint

    base, _ = demo_run
    summary = run_lora_task(str(tmp_path / "lora"), base=str(base))
    assert is_lora_checkpoint(latest_checkpoint(summary["checkpoints"]))  # only the adapters trained
    accuracy = json.load(open(tmp_path / "lora" / "lora_accuracy.json"))
    after, before = accuracy["after"], accuracy["before"]
    assert after["new_color_total"] == before["new_color_total"] == 20, accuracy
    assert after["new_color_accuracy"] >= 0.9, after
    # without the adapters the base never learnt the word: mostly a colour it knows (a red / yellow blend can still
    # read as orange: 10 of 20 when measured), far below the fine-tuned model
    assert before["new_color_accuracy"] <= 0.5 and after["new_color_accuracy"] - before["new_color_accuracy"] >= 0.4
    assert after["known_color_total"] == 4 and after["known_color_accuracy"] >= 0.5, after  # 2 of 4 measured
    assert summary["new_color_accuracy"] == after["new_color_accuracy"]
