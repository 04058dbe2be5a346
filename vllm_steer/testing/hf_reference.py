"""The usual way to steer: Hugging Face ``transformers`` with forward hooks, one setting per batch.

This is the *reference* the engine is proven against (the mixed-batch tests)
and the baseline it is benchmarked against. It deliberately shares nothing
with the batched op: it applies each method's plain formula (the method table's
``reference``, :mod:`vllm_steer.core.methods`, built on :mod:`vllm_steer.core.ops`)
to whole tensors, at the method's hook kinds, found in the HF module tree through
the layout table (:mod:`vllm_steer.core.layout`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from vllm_steer.core.layout import DecoderLayout, layout_for
from vllm_steer.core.methods import METHODS, Setting
from vllm_steer.core.profile import Profile
from vllm_steer.core.request import ResolvedSteering

__all__ = ["reference_op", "steered"]


def reference_op(profile: Profile, steering: ResolvedSteering, layer: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The plain-formula op of ``profile`` at ``layer`` (computed in float32, returned in the input dtype)."""
    tensors = profile.vectors[layer]
    formula = METHODS[profile.method].reference
    setting = Setting(
        angle=steering.angle, scale=steering.scale, threshold=profile.spec.threshold, categories=steering.categories
    )

    def apply(h: torch.Tensor) -> torch.Tensor:
        return formula(h.float(), tensors, setting).to(h.dtype)

    return apply


def _on_output(fn: Callable[[torch.Tensor], torch.Tensor]):
    def hook(module, args, output):
        if isinstance(output, tuple):
            return (fn(output[0]), *output[1:])
        return fn(output)

    return hook


def _on_input(fn: Callable[[torch.Tensor], torch.Tensor], hidden_arg: int | None):
    def hook(module, args, kwargs):
        if hidden_arg is not None and len(args) > hidden_arg:
            args = list(args)
            args[hidden_arg] = fn(args[hidden_arg])
            return tuple(args), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = fn(kwargs["hidden_states"])
        return args, kwargs

    return hook


@contextlib.contextmanager
def steered(
    model: torch.nn.Module,
    profile: Profile | None,
    steering: ResolvedSteering | None,
    layout: DecoderLayout | None = None,
) -> Iterator[None]:
    """Install ``profile``'s hooks with ``steering``'s angle/scale for the duration of the block.

    ``layout`` is the model's HF module tree (default: the layout table's entry for its architecture).
    """
    if profile is None or steering is None:
        yield
        return
    layout = layout or layout_for(model).hf
    if layout.residual != "plain":  # pragma: no cover - every HF layout in the table carries the plain stream
        raise ValueError(f"the reference's hooks implement the plain residual stream, not {layout.residual!r}")
    hidden_arg = layout.arg_index("hidden_states")
    layers = layout.layers(model)
    handles = []
    try:
        for layer in steering.layers or profile.spec.layers:
            block = layers[layer]
            fn = reference_op(profile, steering, layer)
            for kind in METHODS[profile.method].hooks:
                module = layout.module(block, kind)
                if layout.placement(kind).point == "input":
                    handles.append(module.register_forward_pre_hook(_on_input(fn, hidden_arg), with_kwargs=True))
                else:
                    handles.append(module.register_forward_hook(_on_output(fn)))
        yield
    finally:
        for handle in handles:
            handle.remove()
