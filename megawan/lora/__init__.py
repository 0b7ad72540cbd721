"""LoRA on the Wan DiT: adapters on the tensor-parallel linears, and the files the community's tools read.

    from megawan.lora import apply_lora, export_lora, load_lora
    params = apply_lora(model, rank=16, alpha=16)                 # adapters on every block linear; base frozen
    export_lora(model, "my.safetensors", format="diffusers")      # or "comfyui"
    load_lora(model, "someones.safetensors", scale=0.8)           # either format
"""

from megawan.lora.apply import (adapters, apply_lora, base_state_dict, has_lora, is_lora_parameter,
                                lora_parameters, merge_adapters)

__all__ = ["adapters", "apply_lora", "base_state_dict", "has_lora", "is_lora_parameter", "lora_parameters",
           "merge_adapters"]
