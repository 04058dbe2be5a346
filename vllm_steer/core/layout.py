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

Families are keyed by the HF ``architectures`` name (what vLLM resolves a model by): ``llama`` (Llama,
Mistral, Qwen 2/3, Phi-3, and the MoE Qwen3-MoE and OLMoE, whose ``mlp`` is the expert block), ``mixtral``
(vLLM names its MoE block ``block_sparse_moe``), ``gemma`` (Gemma 2 and 3: four norms per block, below) and
``olmo2`` (OLMo 2, which vLLM 0.32 serves through its generic Transformers backend: there vLLM's tree is the
HF tree, with the plain stream, and no norm in front of attention or the MLP, below).
Any other architecture is refused by :func:`family_of`, naming it and the supported list, rather than
hooked on modules that merely share Llama's names. Adding a family is one entry here plus its tiny model
(:mod:`vllm_steer.testing.tiny`) in the family tests.

Gemma's blocks normalize each sublayer's output before adding it to the stream, and the MLP's input with a
third norm. The kinds keep their meaning: ``post_attn_norm`` is the MLP's normalized input
(``pre_feedforward_layernorm``), and ``attn_output``/``mlp_output`` are what is added to the stream (the
outputs of ``post_attention_layernorm`` / ``post_feedforward_layernorm``, not of ``self_attn``/``mlp``).
Gemma scales the embeddings by ``sqrt(hidden_size)`` before the first block in both trees, so
``layer_input`` of layer 0 is the scaled embedding in both.
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
    "NOT_SUPPORTED",
    "UnsupportedArchitecture",
    "architecture_of",
    "family_of",
    "layout_for",
    "vllm_layout_for",
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
            raise TypeError(f"{type(model).__name__} has no model.layers (decoder blocks)")
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
    transformers_backend: bool = False
    """vLLM 0.32 serves the family through its generic Transformers backend (``Transformers*ForCausalLM``),
    not a native model: the engine finds the HF tree inside it."""


def _attr(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


_STREAM = {"layer_input": Placement("", "input"), "layer_output": Placement("")}

# Pre-norm block: input_layernorm → self_attn → (+) → post_attention_layernorm → mlp → (+), the same names in
# vLLM and HF (Llama, Mistral, Qwen2, Qwen3, Phi-3; and Qwen3-MoE and OLMoE, whose ``mlp`` is the MoE block).
_LLAMA_BLOCK = {
    **_STREAM,
    "input_norm": Placement("input_layernorm"),
    "post_attn_norm": Placement("post_attention_layernorm"),
    "attn_output": Placement("self_attn"),
    "mlp_output": Placement("mlp"),
}
# Mixtral: vLLM calls its MoE block ``block_sparse_moe``; transformers 5 calls it ``mlp``.
_MIXTRAL_VLLM_BLOCK = {**_LLAMA_BLOCK, "mlp_output": Placement("block_sparse_moe")}
# Post-norm block (OLMo 2): self_attn → post_attention_layernorm → (+) → mlp → post_feedforward_layernorm → (+),
# no norm in front of attention or the MLP: they read the stream itself. The norm kinds keep their meaning,
# "what the sublayer reads": the input of ``self_attn`` and of ``mlp``, edited for the sublayer only (the
# residual keeps the unedited stream, as a pre-norm block's does). ``attn_output``/``mlp_output`` are the
# post-norms' outputs, what is added to the stream (as Gemma's).
_OLMO2_BLOCK = {
    **_STREAM,
    "input_norm": Placement("self_attn", "input"),
    "post_attn_norm": Placement("mlp", "input"),
    "attn_output": Placement("post_attention_layernorm"),
    "mlp_output": Placement("post_feedforward_layernorm"),
}
# Sandwich norms (Gemma 2 and 3): input_layernorm → self_attn → post_attention_layernorm → (+) →
# pre_feedforward_layernorm → mlp → post_feedforward_layernorm → (+). ``post_attention_layernorm`` normalizes
# attention's *output*; the MLP reads ``pre_feedforward_layernorm``'s. What each sublayer adds to the stream is
# its post-norm's output, so that is where ``attn_output``/``mlp_output`` sit (docs/methods.md §1).
_GEMMA_BLOCK = {
    **_STREAM,
    "input_norm": Placement("input_layernorm"),
    "post_attn_norm": Placement("pre_feedforward_layernorm"),
    "attn_output": Placement("post_attention_layernorm"),
    "mlp_output": Placement("post_feedforward_layernorm"),
}
_VLLM_BLOCK_ARGS = ("positions", "hidden_states", "residual")
_HF_BLOCK_ARGS = ("hidden_states",)


def _family(name: str, vllm_block: Mapping[str, Placement], hf_block: Mapping[str, Placement]) -> ModelLayout:
    return ModelLayout(
        family=name,
        vllm=DecoderLayout("model.layers", vllm_block, residual="fused", block_args=_VLLM_BLOCK_ARGS),
        hf=DecoderLayout("model.layers", hf_block, residual="plain", block_args=_HF_BLOCK_ARGS),
    )


def _transformers_family(name: str, block: Mapping[str, Placement]) -> ModelLayout:
    """A family vLLM serves through its Transformers backend: vLLM's tree *is* the HF tree (the backend wraps
    ``AutoModel``: ``model.layers`` are HF's blocks, carrying the plain stream, with vLLM's attention inside)."""
    hf = DecoderLayout("model.layers", block, residual="plain", block_args=_HF_BLOCK_ARGS)
    return ModelLayout(family=name, vllm=hf, hf=hf, transformers_backend=True)


FAMILIES: Mapping[str, ModelLayout] = MappingProxyType(
    {
        "llama": _family("llama", _LLAMA_BLOCK, _LLAMA_BLOCK),
        "mixtral": _family("mixtral", _MIXTRAL_VLLM_BLOCK, _LLAMA_BLOCK),
        "gemma": _family("gemma", _GEMMA_BLOCK, _GEMMA_BLOCK),
        "olmo2": _transformers_family("olmo2", _OLMO2_BLOCK),
    }
)
"""Family → its layout in vLLM's and in Hugging Face's module tree."""

ARCHITECTURES: Mapping[str, str] = MappingProxyType(
    {
        "LlamaForCausalLM": "llama",
        "MistralForCausalLM": "llama",
        "Qwen2ForCausalLM": "llama",
        "Qwen3ForCausalLM": "llama",
        "Phi3ForCausalLM": "llama",
        "Qwen3MoeForCausalLM": "llama",
        "OlmoeForCausalLM": "llama",
        "MixtralForCausalLM": "mixtral",
        "Gemma2ForCausalLM": "gemma",
        "Gemma3ForCausalLM": "gemma",
        "Olmo2ForCausalLM": "olmo2",
    }
)
"""HF ``architectures`` name → family: every architecture vllm-steer hooks. Any other is refused."""

NOT_SUPPORTED: Mapping[str, str] = MappingProxyType(
    {
        "Gemma3ForConditionalGeneration": "the multimodal Gemma 3 wraps its decoder in another tree; serve the "
        "text-only checkpoint (Gemma3ForCausalLM)",
    }
)
"""Architectures known and refused, with the reason (an unknown one is refused naming the supported list)."""


class UnsupportedArchitecture(ValueError):
    """A model whose module tree vllm-steer has no layout for: refused rather than hooked wrongly."""


def architecture_of(model: torch.nn.Module) -> str:
    """A model's architecture name: its config's ``architectures[0]`` (HF and vLLM models keep the HF config
    as ``model.config``), else its class name (vLLM names its model classes after the architecture)."""
    archs = getattr(getattr(model, "config", None), "architectures", None)
    return str(archs[0]) if archs else type(model).__name__


def family_of(architecture: str) -> str:
    """The layout family of an HF architecture name; :class:`UnsupportedArchitecture` names it and the supported ones."""
    family = ARCHITECTURES.get(architecture)
    if family is not None:
        return family
    supported = ", ".join(sorted(ARCHITECTURES))
    reason = NOT_SUPPORTED.get(architecture, "no entry in vllm_steer.core.layout (one per module tree)")
    raise UnsupportedArchitecture(
        f"vllm-steer cannot steer {architecture}: {reason}. Supported architectures: {supported}"
    )


def layout_for(model_or_architecture: torch.nn.Module | str) -> ModelLayout:
    """The layout of a model (a ``torch`` module, vLLM's or HF's) or of an HF architecture name."""
    if isinstance(model_or_architecture, str):
        return FAMILIES[family_of(model_or_architecture)]
    if getattr(getattr(model_or_architecture, "config", None), "ada_rms_norm_t_cond", False):
        raise UnsupportedArchitecture(
            f"vllm-steer cannot steer {architecture_of(model_or_architecture)} with ada_rms_norm_t_cond (Voxtral's "
            "time conditioning): it rescales the MLP's input after post_attention_layernorm, where post_attn_norm "
            "is hooked, so a rotation there would not be what the MLP reads"
        )
    return FAMILIES[family_of(architecture_of(model_or_architecture))]


def vllm_layout_for(model: torch.nn.Module) -> DecoderLayout:
    """The vLLM module tree of a model vLLM built: its family's, if vLLM built the tree the table describes.

    vLLM serves most families natively (its own blocks, the fused stream) and some through its generic
    Transformers backend (``Transformers*ForCausalLM``: the HF tree inside); a model served the other way
    (e.g. Llama forced onto the Transformers backend) is refused rather than hooked in a tree the entry does
    not describe."""
    layout = layout_for(model)
    cls = type(model).__name__
    backend = cls.startswith("Transformers") and cls.endswith("ForCausalLM")
    if backend != layout.transformers_backend:
        how = "through vLLM's Transformers backend" if backend else "natively by vLLM"
        expected = "through the Transformers backend" if layout.transformers_backend else "natively"
        raise UnsupportedArchitecture(
            f"vllm-steer cannot steer {architecture_of(model)} served {how} ({cls}): its layout entry describes "
            f"the tree vLLM 0.32 builds {expected} (serve it with vLLM's default model implementation)"
        )
    return layout.vllm


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder blocks of ``model`` (``model.model.layers``, or ``model.layers``)."""
    return layout_for(model).hf.layers(model)
