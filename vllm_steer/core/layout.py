"""Where the hook sites live in a decoder model (vLLM's and Hugging Face's module trees).

Both vLLM and Hugging Face lay a Llama-style decoder out as ``model.model.layers[i]`` with
``input_layernorm``, ``self_attn``, ``post_attention_layernorm`` and ``mlp``; the engine's hooks
(:mod:`vllm_steer.engine.vllm`), the HF reference (:mod:`vllm_steer.testing.hf_reference`) and
calibration (:mod:`vllm_steer.calibration.stats`) all read the module tree through this module.
"""

from __future__ import annotations

import torch

__all__ = ["decoder_layers"]


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder blocks of ``model`` (``model.model.layers``, or ``model.layers``)."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise TypeError(f"{type(model).__name__} has no model.layers; only Llama-style decoders are supported")
    return layers
