"""Which of a block's linears get adapters: peft's `target_modules`, in any of the three names a Wan linear has.

    megawan    self_attention.linear_q   cross_attention.linear_k_img   mlp.linear_fc1
    official   self_attn.q               cross_attn.k_img               ffn.0           (ComfyUI / kohya LoRAs)
    diffusers  attn1.to_q                attn2.add_k_proj               ffn.net.0.proj  (peft / diffusers LoRAs)

A target names a linear by one of its names or by a dotted suffix of one, as peft matches module names: `q`
adapts both attentions' q, `self_attn.q` only the self-attention's, `to_out.0` both output projections, `ffn`
nothing (no linear is called that). The default adapts every linear of every block (as musubi-tuner and
DiffSynth-Studio do for Wan): q, k, v, o of both attentions, the image branch's k_img / v_img (Wan2.1 I2V),
and both FFN layers.
"""

from __future__ import annotations

from typing import Iterable, Optional

from megawan.convert.dit_keys import BLOCK, BLOCK_IMAGE

# (megawan, official, diffusers) names of the adaptable linears, relative to a block
LINEARS = tuple((m, o, d) for m, o, d, params in BLOCK + BLOCK_IMAGE if params == ("weight", "bias"))
DEFAULT_TARGETS = ("q", "k", "v", "o", "k_img", "v_img", "ffn.0", "ffn.2")


def _matches(target: str, names: tuple) -> bool:
    return any(name == target or name.endswith("." + target) for name in names)


def select_linears(targets: Optional[Iterable[str]] = None, image_branch: bool = True) -> list:
    """The megawan names (relative to a block) of the linears `targets` select. A target that selects nothing
    is refused, naming it (a typo would otherwise train nothing)."""
    rows = [row for row in LINEARS if image_branch or not row[0].endswith("_img")]
    explicit = targets is not None
    targets = list(DEFAULT_TARGETS if targets is None else targets)
    if explicit and not targets:
        raise ValueError("lora.targets is empty: name the linears to adapt (or leave it unset for all of them)")
    chosen = []
    for target in targets:
        hits = [row[0] for row in rows if _matches(str(target), row)]
        if not hits and explicit:
            known = ", ".join(o for _, o, _ in rows)
            raise ValueError(f"lora.targets: {target!r} names no linear of a Wan block (known: {known}; "
                             "megawan and diffusers names work too)")
        chosen += [h for h in hits if h not in chosen]
    return [row[0] for row in rows if row[0] in chosen]  # in the block's order


def names_of(megawan_name: str) -> tuple:
    """(megawan, official, diffusers) names of one block linear."""
    for row in LINEARS:
        if row[0] == megawan_name:
            return row
    raise KeyError(megawan_name)
