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
from dataclasses import dataclass, field

import torch

from vllm_steer.core.gates import GATE_HOOK, GatingSpec, gate_score, margin, route_of
from vllm_steer.core.layout import DecoderLayout, layout_for
from vllm_steer.core.methods import Setting
from vllm_steer.core.profile import Profile
from vllm_steer.core.request import ResolvedSteering, route_targets

__all__ = ["reference_op", "steered", "GateRecord"]


def reference_op(profile: Profile, steering: ResolvedSteering, layer: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The plain-formula op of ``profile`` at ``layer`` (computed in float32, returned in the input dtype)."""
    tensors = profile.vectors[layer]
    formula = profile.spec.method_spec.reference
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


@dataclass
class GateRecord:
    """What a gated profile's gates decided in a :func:`steered` block (one request: batch of one, one
    ``generate`` call). ``fired`` is ``None`` until the prompt's forward pass has passed every gate."""

    fired: bool | None = None
    scores: dict[str, float] = field(default_factory=dict)
    prompt_pass: bool = True
    """The first forward pass (the whole prompt) is running; later passes are generated tokens."""
    decided_after: int = -1
    category: str | None = None
    """A routing request (``steer_categories: "auto"``): the category it is steered with, once decided."""


def _gate_reader(profile: Profile, layer: int, record: GateRecord):
    """At ``layer``'s output, on the prompt's pass: score the last prompt token against the gates there."""
    assert profile.spec.gating is not None
    gates = [g for g in profile.spec.gating.gates if g.layer == layer]

    def hook(module, args, output):
        if record.prompt_pass:
            h = output[0] if isinstance(output, tuple) else output
            last = h.reshape(-1, h.shape[-1])[-1]  # batch of one: the last prompt token
            for gate in gates:
                value = float(gate_score(last, profile.gate_vectors[gate.name], gate.score))
                record.scores[gate.name] = value
                if gate.category is None:  # a deciding gate (routing gates only route)
                    record.fired = bool(record.fired) or margin(gate, value) > 0
        return output

    return hook


def _routed(ops: dict[str, Callable[[torch.Tensor], torch.Tensor]], gating: GatingSpec, record: GateRecord):
    """A (gated) routing request's op: that of the category whose routing gate has the largest margin
    (``route_of``)."""

    def apply(h: torch.Tensor) -> torch.Tensor:
        record.category = route_of(gating, record.scores)
        return h if record.category is None else ops[record.category](h)

    return apply


def _gated(fn: Callable[[torch.Tensor], torch.Tensor], layer: int, record: GateRecord):
    """``fn`` under the gate: on the prompt's pass only the last token, only after the deepest gate's layer,
    only if fired; on later passes every token, if fired (docs/methods.md §3.11)."""

    def apply(h: torch.Tensor) -> torch.Tensor:
        if not record.fired:
            return h
        if not record.prompt_pass:
            return fn(h)
        if layer <= record.decided_after:
            return h
        out = h.clone()
        out[..., -1, :] = fn(h[..., -1:, :])[..., 0, :]
        return out

    return apply


@contextlib.contextmanager
def steered(
    model: torch.nn.Module,
    profile: Profile | None,
    steering: ResolvedSteering | None,
    layout: DecoderLayout | None = None,
) -> Iterator[GateRecord | None]:
    """Install ``profile``'s hooks with ``steering``'s angle/scale for the duration of the block.

    ``layout`` is the model's HF module tree (default: the layout table's entry for its architecture). A gated
    profile (one request per block, one ``generate``) also reads its gates on the prompt's last token and
    steers by the rule of docs/methods.md §3.11; the block gets the :class:`GateRecord` (``None`` ungated).
    """
    if profile is None or steering is None:
        yield None
        return
    layout = layout or layout_for(model).hf
    if layout.residual != "plain":  # pragma: no cover - every HF layout in the table carries the plain stream
        raise ValueError(f"the reference's hooks implement the plain residual stream, not {layout.residual!r}")
    hidden_arg = layout.arg_index("hidden_states")
    layers = layout.layers(model)
    handles = []
    gating = profile.spec.gating
    record = GateRecord(decided_after=gating.decided_after) if gating is not None else None
    try:
        if gating is not None:
            assert record is not None
            for layer in gating.layers:  # registered first: a gate reads its layer's output before any edit there
                module = layout.module(layers[layer], GATE_HOOK)
                handles.append(module.register_forward_hook(_gate_reader(profile, layer, record)))

            def end_of_pass(module, args, output):
                record.prompt_pass = False
                return output

            handles.append(model.register_forward_hook(end_of_pass))
        steers = gating is None or steering.gate_action == "steer"  # the request's action (the profile's by default)
        for layer in (steering.layers or profile.spec.layers) if steers else ():
            block = layers[layer]
            if steering.route:
                assert gating is not None and record is not None
                ops = {t.categories[0]: reference_op(profile, t, layer) for t in route_targets(steering)}
                fn = _routed(ops, gating, record)
            else:
                fn = reference_op(profile, steering, layer)
            if record is not None:
                fn = _gated(fn, layer, record)
            for kind in profile.spec.hooks:
                module = layout.module(block, kind)
                if layout.placement(kind).point == "input":
                    handles.append(module.register_forward_pre_hook(_on_input(fn, hidden_arg), with_kwargs=True))
                else:
                    handles.append(module.register_forward_hook(_on_output(fn)))
        yield record
    finally:
        for handle in handles:
            handle.remove()
