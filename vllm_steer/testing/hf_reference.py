"""The usual way to steer: Hugging Face ``transformers`` with forward hooks, one setting per batch.

This is the *reference* the engine is proven against (the mixed-batch tests)
and the baseline it is benchmarked against. It deliberately shares nothing
with the batched op: it applies the per-method reference functions of
:mod:`vllm_steer.core.ops` to whole tensors, at the hook points of ``docs/methods.md`` §1,
on a plain ``transformers`` Llama-style model (``model.model.layers[i]`` with
``input_layernorm``, ``post_attention_layernorm``, ``self_attn``, ``mlp``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from vllm_steer.core import ops
from vllm_steer.core.layout import decoder_layers
from vllm_steer.core.profile import METHOD_HOOKS, Profile
from vllm_steer.core.request import ResolvedSteering

__all__ = ["reference_op", "steered"]


def reference_op(profile: Profile, steering: ResolvedSteering, layer: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The plain-formula op of ``profile`` at ``layer`` (computed in float32, returned in the input dtype)."""
    roles = profile.vectors[layer]
    method = profile.method

    def apply(h: torch.Tensor) -> torch.Tensor:
        x = h.float()
        if method in ("addition", "category"):
            keys = steering.categories if method == "category" else ("vector",)
            v = torch.stack([roles[k] for k in keys]).sum(0)
            out = ops.add(x, v, steering.scale)
        elif method == "probe":
            out = ops.probe(x, roles["vector"], steering.scale)
        elif method == "ablation":
            out = ops.ablate(x, roles["vector"])
        elif method == "angular_standard":
            out = ops.angular_standard(x, roles["b1"], roles["b2"], steering.angle)
        elif method == "angular_adaptive":
            out = ops.angular_adaptive(x, roles["b1"], roles["b2"], steering.angle, profile.spec.threshold)
        elif method == "selective":
            out = ops.selective_rotation(x, roles["b1"], roles["b2"], steering.angle)
        else:  # pragma: no cover - the schema admits no other method
            raise ValueError(method)
        return out.to(h.dtype)

    return apply


def _on_output(fn: Callable[[torch.Tensor], torch.Tensor]):
    def hook(module, args, output):
        if isinstance(output, tuple):
            return (fn(output[0]), *output[1:])
        return fn(output)

    return hook


def _on_input(fn: Callable[[torch.Tensor], torch.Tensor]):
    def hook(module, args, kwargs):
        if args:
            return (fn(args[0]), *args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = fn(kwargs["hidden_states"])
        return args, kwargs

    return hook


@contextlib.contextmanager
def steered(model: torch.nn.Module, profile: Profile | None, steering: ResolvedSteering | None) -> Iterator[None]:
    """Install ``profile``'s hooks with ``steering``'s angle/scale for the duration of the block."""
    if profile is None or steering is None:
        yield
        return
    layers = decoder_layers(model)
    handles = []
    try:
        for layer in steering.layers or profile.spec.layers:
            block = layers[layer]
            fn = reference_op(profile, steering, layer)
            for kind in METHOD_HOOKS[profile.method]:
                if kind == "layer_input":
                    handles.append(block.register_forward_pre_hook(_on_input(fn), with_kwargs=True))
                elif kind == "layer_output":
                    handles.append(block.register_forward_hook(_on_output(fn)))
                else:
                    module = {
                        "input_norm": block.input_layernorm,
                        "post_attn_norm": block.post_attention_layernorm,
                        "attn_output": block.self_attn,
                        "mlp_output": block.mlp,
                    }[kind]
                    handles.append(module.register_forward_hook(_on_output(fn)))
        yield
    finally:
        for handle in handles:
            handle.remove()
