"""The steering op hooked into a vLLM decoder at its sites."""

from __future__ import annotations

from typing import Any

import torch

from vllm_steer.core.layout import decoder_layers
from vllm_steer.engine.runtime import Site

__all__ = ["install_hooks"]

def _delta(h: torch.Tensor, site: int) -> torch.Tensor:
    return torch.ops.vllm_steer.delta(h, site)

def install_hooks(model: torch.nn.Module, sites: list[Site]) -> list[Any]:
    """Hook the op into a vLLM Llama-style model at ``sites``; returns the hook handles.

    vLLM's decoder layers return ``(hidden_states, residual)`` and fuse the
    residual add into the next norm, so the residual stream is their sum:
    projections of the stream are computed on the sum, and every correction is
    added to ``hidden_states`` (``+ 0`` for unsteered rows, hence bit-exact).
    """
    layers = decoder_layers(model)  # same module layout as Hugging Face Llama-style models
    handles = []
    for index, site in enumerate(sites):
        block = layers[site.layer]
        if site.kind == "input_norm":
            handles.append(block.input_layernorm.register_forward_hook(_norm_hook(index)))
        elif site.kind == "post_attn_norm":
            handles.append(block.post_attention_layernorm.register_forward_hook(_norm_hook(index)))
        elif site.kind == "attn_output":
            handles.append(block.self_attn.register_forward_hook(_tensor_hook(index)))
        elif site.kind == "mlp_output":
            handles.append(block.mlp.register_forward_hook(_tensor_hook(index)))
        elif site.kind == "layer_output":
            handles.append(block.register_forward_hook(_layer_output_hook(index)))
        elif site.kind == "layer_input":
            handles.append(block.register_forward_pre_hook(_layer_input_hook(index), with_kwargs=True))
        else:  # pragma: no cover - sites come from METHOD_HOOKS
            raise ValueError(f"unknown hook kind {site.kind!r}")
    return handles

def _norm_hook(site: int):
    def hook(module, args, output):
        if isinstance(output, tuple):  # fused add + norm: (normed, residual)
            normed, residual = output
            return normed + _delta(normed, site), residual
        return output + _delta(output, site)

    return hook

def _tensor_hook(site: int):
    def hook(module, args, output):
        return output + _delta(output, site)

    return hook

def _layer_output_hook(site: int):
    def hook(module, args, output):
        hidden, residual = output
        return hidden + _delta(hidden + residual, site), residual

    return hook

def _layer_input_hook(site: int):
    def hook(module, args, kwargs):
        args = list(args)
        hidden = args[1] if len(args) > 1 else kwargs["hidden_states"]
        residual = args[2] if len(args) > 2 else kwargs.get("residual")
        stream = hidden if residual is None else hidden + residual
        steered = hidden + _delta(stream, site)
        if len(args) > 1:
            args[1] = steered
        else:
            kwargs = {**kwargs, "hidden_states": steered}
        return tuple(args), kwargs

    return hook
