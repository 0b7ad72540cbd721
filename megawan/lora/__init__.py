"""LoRA on the Wan DiT: adapters on the tensor-parallel linears, and the files the community's tools read.

    from megawan.lora import apply_lora, export_lora, load_lora
    params = apply_lora(model, rank=16, alpha=16)                 # adapters on every block linear; base frozen
    export_lora(model, "my.safetensors", format="diffusers")      # or "comfyui"
    load_lora(model, "someones.safetensors", scale=0.8)           # either format
"""

from megawan.lora.apply import (adapters, apply_lora, base_state_dict, has_lora, is_lora_parameter,
                                lora_parameters, merge_adapters)
from megawan.lora.formats import (FORMATS, LoRAFile, LoRAFileError, LoRATensors, export_lora, load_lora,
                                  merge_lora_file, read_lora_file, write_lora_file)

__all__ = ["FORMATS", "LoRAFile", "LoRAFileError", "LoRATensors", "adapters", "apply_lora", "base_state_dict",
           "export_lora", "has_lora", "is_lora_parameter", "load_lora", "lora_parameters", "merge_adapters",
           "merge_lora_file", "read_lora_file", "write_lora_file"]
