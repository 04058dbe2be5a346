"""Where the hook sites live in a decoder model, in vLLM's module tree and in Hugging Face's: one table.

A *hook kind* names a point of a decoder block that a method edits (``docs/methods.md`` §1). Where that
point is depends on the model's module tree, which depends on its family and on who built it (vLLM or
``transformers``). The engine's hooks (:mod:`vllm_steer.engine.vllm`), the HF reference
(:mod:`vllm_steer.testing.hf_reference`) and calibration (:mod:`vllm_steer.calibration.stats`) all find
their modules here, so they cannot disagree about where a method acts.

=================  =======================================  ===========================================
hook kind          Llama-style block (vLLM and HF alike)    what is read / edited there
=================  =======================================  ===========================================
``layer_input``    the block's input                        the residual stream entering the block
``layer_output``   the block's output                       the residual stream leaving the block
``input_norm``     ``input_layernorm``'s output             the normalized stream attention reads
``post_attn_norm`` ``post_attention_layernorm``'s output    the normalized stream the MLP reads
``attn_output``    ``self_attn``'s output                   what attention adds to the stream
``mlp_output``     ``mlp``'s output                         what the MLP adds to the stream
=================  =======================================  ===========================================

The two trees differ in how they carry the residual stream. vLLM's decoder layers take and return
``(hidden_states, residual)`` and fuse the residual add into the next norm (which then returns
``(normed, residual)``), so the stream is ``hidden_states + residual`` (``residual="fused"``);
``transformers`` passes the stream itself (``residual="plain"``).

Families are keyed by the HF ``architectures`` name (what vLLM resolves a model by). Today there is one
family, ``llama``, and every architecture gets its layout — as before this table existed. Issue 18
adds families as entries of :data:`FAMILIES` / :data:`ARCHITECTURES` and refuses unknown architectures
in :func:`family_of`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal, get_args

import torch

__all__ = [
    "HookKind",
    "HOOK_KINDS",
    "Placement",
    "DecoderLayout",
    "ModelLayout",
    "FAMILIES",
    "ARCHITECTURES",
    "architecture_of",
    "family_of",
    "layout_for",
    "decoder_layers",
]

HookKind = Literal["layer_input", "attn_output", "mlp_output", "layer_output", "input_norm", "post_attn_norm"]
HOOK_KINDS: tuple[str, ...] = get_args(HookKind)
"""Every hook kind a method may name (:mod:`vllm_steer.core.methods` says which each method uses)."""


@dataclass(frozen=True)
class Placement:
    """Where one hook kind sits in a decoder block.

    ``module`` is the attribute path of a submodule of the block (``""``: the block itself, whose input
    and output are the residual stream); ``point`` is whether the hook reads that module's input (a
    forward pre-hook) or its output (a forward hook).
    """

    module: str
    point: Literal["input", "output"] = "output"

    @property
    def stream(self) -> bool:
        """The residual stream itself (the block's input or output), not one module's output."""
        return self.module == ""


@dataclass(frozen=True)
class DecoderLayout:
    """One module tree's decoder: where the blocks are, where each hook kind sits, how the stream is carried."""

    layers_path: str
    """Attribute path from the causal-LM model to its ``ModuleList`` of decoder blocks."""
    placements: Mapping[str, Placement]
    """Hook kind → where it sits in a block."""
    residual: Literal["fused", "plain"]
    """``fused``: blocks take and return ``(hidden_states, residual)``, the stream is their sum (vLLM);
    ``plain``: blocks take and return the stream (``transformers``)."""
    block_args: tuple[str, ...]
    """The block's ``forward`` parameters, in order (where a pre-hook finds ``hidden_states``/``residual``)."""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.placements) - set(HOOK_KINDS))
        if unknown:
            raise ValueError(f"layout names unknown hook kinds {unknown} (known: {', '.join(HOOK_KINDS)})")
        object.__setattr__(self, "placements", MappingProxyType(dict(self.placements)))

    def layers(self, model: torch.nn.Module) -> torch.nn.ModuleList:
        """The decoder blocks of ``model`` (``model.model.layers``; a bare base model's ``layers`` too)."""
        layers = _attr(model, self.layers_path)
        if not isinstance(layers, torch.nn.ModuleList):  # a base model (no LM head): its own ``layers``
            layers = _attr(model, self.layers_path.rsplit(".", 1)[-1])
        if not isinstance(layers, torch.nn.ModuleList):
            raise TypeError(f"{type(model).__name__} has no model.layers; only Llama-style decoders are supported")
        return layers

    def placement(self, kind: str) -> Placement:
        """Where ``kind`` sits in a block; an unknown kind is a :class:`ValueError` naming the known ones."""
        try:
            return self.placements[kind]
        except KeyError:
            raise ValueError(f"unknown hook kind {kind!r} (known: {', '.join(self.placements)})") from None

    def module(self, block: torch.nn.Module, kind: str) -> torch.nn.Module:
        """The module of ``block`` a hook of ``kind`` attaches to (the block itself for the stream kinds)."""
        path = self.placement(kind).module
        module = _attr(block, path) if path else block
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"{type(block).__name__} has no {path!r} for hook kind {kind!r}")
        return module

    def arg_index(self, name: str) -> int | None:
        """Position of the block's ``forward`` parameter ``name`` (``None``: it has none)."""
        return self.block_args.index(name) if name in self.block_args else None


@dataclass(frozen=True)
class ModelLayout:
    """A family's layout in both module trees."""

    family: str
    vllm: DecoderLayout
    hf: DecoderLayout


def _attr(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


_LLAMA_BLOCK = {
    "layer_input": Placement("", "input"),
    "layer_output": Placement(""),
    "input_norm": Placement("input_layernorm"),
    "post_attn_norm": Placement("post_attention_layernorm"),
    "attn_output": Placement("self_attn"),
    "mlp_output": Placement("mlp"),
}

FAMILIES: Mapping[str, ModelLayout] = MappingProxyType(
    {
        "llama": ModelLayout(
            family="llama",
            vllm=DecoderLayout(
                "model.layers", _LLAMA_BLOCK, residual="fused", block_args=("positions", "hidden_states", "residual")
            ),
            hf=DecoderLayout("model.layers", _LLAMA_BLOCK, residual="plain", block_args=("hidden_states",)),
        ),
    }
)
"""Family → its layout in vLLM's and in Hugging Face's module tree."""

ARCHITECTURES: Mapping[str, str] = MappingProxyType(
    {
        "LlamaForCausalLM": "llama",
    }
)
"""HF ``architectures`` name → family. Architectures not listed get the ``llama`` layout (see :func:`family_of`)."""

DEFAULT_FAMILY = "llama"


def architecture_of(model: torch.nn.Module) -> str:
    """A model's architecture name: its config's ``architectures[0]`` (HF and vLLM models keep the HF config
    as ``model.config``), else its class name (vLLM names its model classes after the architecture)."""
    archs = getattr(getattr(model, "config", None), "architectures", None)
    return str(archs[0]) if archs else type(model).__name__


def family_of(architecture: str) -> str:
    """The layout family of an HF architecture name.

    Every architecture not in :data:`ARCHITECTURES` gets the Llama-style layout, as before the table
    existed. Issue 18 turns this into a refusal naming the architecture and the supported list.
    """
    return ARCHITECTURES.get(architecture, DEFAULT_FAMILY)


def layout_for(model_or_architecture: torch.nn.Module | str) -> ModelLayout:
    """The layout of a model (a ``torch`` module, vLLM's or HF's) or of an HF architecture name."""
    arch = model_or_architecture if isinstance(model_or_architecture, str) else architecture_of(model_or_architecture)
    return FAMILIES[family_of(arch)]


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder blocks of ``model`` (``model.model.layers``, or ``model.layers``)."""
    return layout_for(model).hf.layers(model)
