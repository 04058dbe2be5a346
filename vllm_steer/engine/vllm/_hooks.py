"""The steering op hooked into a vLLM decoder at its sites (where each site is: :mod:`vllm_steer.core.layout`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from vllm_steer.core.layout import DecoderLayout, vllm_layout_for
from vllm_steer.engine.runtime import Site

__all__ = ["install_hooks"]


_OutputHook = Callable[[torch.nn.Module, Any, Any], Any]
_InputHook = Callable[[torch.nn.Module, tuple[Any, ...], dict[str, Any]], tuple[tuple[Any, ...], dict[str, Any]]]


def _delta(h: torch.Tensor, site: int) -> torch.Tensor:
    """The op's correction for ``h`` (tokens × hidden; the Transformers backend's ``1 × tokens × hidden`` too)."""
    if h.dim() == 3:  # vLLM's Transformers backend runs HF's blocks on a batch of one holding every token
        flat: torch.Tensor = torch.ops.vllm_steer.delta(h.flatten(0, 1), site)
        return flat.view_as(h)
    out: torch.Tensor = torch.ops.vllm_steer.delta(h, site)
    return out


def install_hooks(model: torch.nn.Module, sites: list[Site], layout: DecoderLayout | None = None) -> list[Any]:
    """Hook the op into a vLLM model at ``sites``; returns the hook handles.

    ``layout`` is the model's vLLM module tree (default: the layout table's entry for its architecture).
    vLLM's native decoder layers return ``(hidden_states, residual)`` and fuse the residual add into the next
    norm, so the residual stream is their sum: projections of the stream are computed on the sum, and
    every correction is added to ``hidden_states`` (``+ 0`` for unsteered rows, hence bit-exact). Under the
    Transformers backend (``residual="plain"``) a block takes and returns the stream itself.
    """
    layout = layout or vllm_layout_for(model)
    hidden_arg = layout.arg_index("hidden_states")
    residual_arg = layout.arg_index("residual")
    layers = layout.layers(model)
    handles = []
    for index, site in enumerate(sites):
        block = layers[site.layer]
        placement = layout.placement(site.kind)
        module = layout.module(block, site.kind)
        if placement.point == "input":
            # a block's input (its hidden_states argument), or a sublayer's (its first argument / hidden_states)
            args = (hidden_arg, residual_arg) if placement.stream else (0, None)
            handles.append(module.register_forward_pre_hook(_stream_input_hook(index, *args), with_kwargs=True))
        elif placement.stream and layout.residual == "fused":
            handles.append(module.register_forward_hook(_stream_output_hook(index)))
        else:
            handles.append(module.register_forward_hook(_module_output_hook(index)))
    return handles


def _module_output_hook(site: int) -> _OutputHook:
    """A submodule's output: a tensor, or (fused add + norm) ``(normed, residual)`` whose first part is steered."""

    def hook(module: torch.nn.Module, args: Any, output: Any) -> Any:
        if isinstance(output, tuple):
            return (output[0] + _delta(output[0], site), *output[1:])
        return output + _delta(output, site)

    return hook


def _stream_output_hook(site: int) -> _OutputHook:
    def hook(module: torch.nn.Module, args: Any, output: Any) -> Any:
        hidden, residual = output
        return hidden + _delta(hidden + residual, site), residual

    return hook


def _stream_input_hook(site: int, hidden_arg: int | None, residual_arg: int | None) -> _InputHook:
    def hook(
        module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        values = list(args)
        hidden = values[hidden_arg] if hidden_arg is not None and len(values) > hidden_arg else kwargs["hidden_states"]
        residual = (
            values[residual_arg] if residual_arg is not None and len(values) > residual_arg else kwargs.get("residual")
        )
        stream = hidden if residual is None else hidden + residual
        steered = hidden + _delta(stream, site)
        if hidden_arg is not None and len(values) > hidden_arg:
            values[hidden_arg] = steered
        else:
            kwargs = {**kwargs, "hidden_states": steered}
        return tuple(values), kwargs

    return hook
