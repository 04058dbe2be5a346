"""Calibration core: activations of harmful vs harmless prompts → directions, plane, discriminative layers.

Follows ``docs/methods.md`` §2 (Selective Steering's pipeline) with Hugging Face
``transformers`` on the same weights the engine serves, hooked at the same
points the runtime steers (the layout table, :mod:`vllm_steer.core.layout`):

* the last token of the formatted prompt (chat-templated, or the raw text for a base model without a
  template: :func:`format_prompts`) is read at every hook site;
* statistics are *running* sums per class (raw and per-sample unit-normalized),
  so memory does not grow with the number of prompts;
* ``d_k = normalize(μ_pos − μ_neg)`` per site; ``b1`` = the candidate with the
  highest mean cosine to all candidates (self included); ``b2`` = first
  principal axis of the centred candidates, Gram–Schmidt against ``b1``;
* a block is discriminative iff at every one of its norm sites the mean
  per-sample cosines with ``b1`` of the two classes have opposite signs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from vllm_steer.core.extras import require
from vllm_steer.core.layout import DecoderLayout, layout_for
from vllm_steer.core.methods import METHODS

__all__ = [
    "ClassStats",
    "collect_activations",
    "diff_of_means",
    "select_b1",
    "second_axis",
    "discriminative_layers",
    "chat_prompts",
    "plain_prompts",
    "format_prompts",
    "has_chat_template",
    "resolve_prompt_format",
    "PROMPT_FORMATS",
    "fit_probe",
]

NORM_KINDS: tuple[str, ...] = METHODS["selective"].hooks
"""The norm-output sites the plane methods steer: the plane's candidates and the discriminative test read them."""

PROMPT_FORMATS: tuple[str, ...] = ("auto", "chat", "plain")
"""How prompts are formatted (docs/methods.md §2.1): ``chat`` (the model's chat template), ``plain`` (the raw
text, for base models), ``auto`` (``chat`` when the tokenizer has a chat template, else ``plain``)."""


@dataclass
class ClassStats:
    """Running sums of last-token activations per site (``(layer, kind)``) for one class."""

    count: int = 0
    total: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    total_unit: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    samples: dict[tuple[int, str], list[torch.Tensor]] | None = None
    """Per-sample activations, kept only when asked (probes need them; means do not)."""

    def add(self, site: tuple[int, str], acts: torch.Tensor) -> None:
        if self.samples is not None:
            self.samples.setdefault(site, []).append(acts.float().clone())
        acts = acts.double()
        unit = acts / (acts.norm(dim=-1, keepdim=True) + 1e-8)
        if site in self.total:
            self.total[site] += acts.sum(0)
            self.total_unit[site] += unit.sum(0)
        else:
            self.total[site] = acts.sum(0)
            self.total_unit[site] = unit.sum(0)

    def mean(self, site: tuple[int, str]) -> torch.Tensor:
        return self.total[site] / self.count

    def mean_unit(self, site: tuple[int, str]) -> torch.Tensor:
        return self.total_unit[site] / self.count


def chat_prompts(tokenizer, prompts: Sequence[str], system: str | None = None) -> list[str]:
    """The model's chat template, one user turn, generation prompt on; no system message (docs/methods.md §2.1)
    unless ``system`` is given (the safety-system-prompt contrast)."""
    head = [{"role": "system", "content": system}] if system else []
    return [
        tokenizer.apply_chat_template(
            [*head, {"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p in prompts
    ]


def plain_prompts(prompts: Sequence[str], system: str | None = None) -> list[str]:
    """Base models: each prompt's raw text. ``system`` (the safety-system-prompt contrast) has no system turn to
    go in, so its text and a blank line are put before the prompt: a plain-text stand-in (docs/methods.md §2.1)."""
    return [f"{system}\n\n{p}" if system else p for p in prompts]


def has_chat_template(tokenizer) -> bool:
    """Whether ``tokenizer`` carries a chat template (instruct models do; many base models do not)."""
    return bool(getattr(tokenizer, "chat_template", None))


def resolve_prompt_format(tokenizer, requested: str) -> str:
    """``chat`` or ``plain`` for ``requested`` (one of :data:`PROMPT_FORMATS`); ``ValueError`` for an unknown
    format, or ``chat`` on a tokenizer without a chat template."""
    if requested not in PROMPT_FORMATS:
        raise ValueError(f"unknown {requested!r} (one of {', '.join(PROMPT_FORMATS)})")
    if requested == "auto":
        return "chat" if has_chat_template(tokenizer) else "plain"
    if requested == "chat" and not has_chat_template(tokenizer):
        raise ValueError(
            "'chat' needs a chat template and this tokenizer has none (a base model?); use 'plain' or 'auto'"
        )
    return requested


def format_prompts(tokenizer, prompts: Sequence[str], prompt_format: str, system: str | None = None) -> list[str]:
    """``prompts`` in ``prompt_format`` (``chat``: :func:`chat_prompts`; ``plain``: :func:`plain_prompts`)."""
    if prompt_format == "chat":
        return chat_prompts(tokenizer, prompts, system)
    if prompt_format == "plain":
        return plain_prompts(prompts, system)
    raise ValueError(f"prompt format {prompt_format!r} is neither 'chat' nor 'plain' (resolve 'auto' first)")


@torch.no_grad()
def collect_activations(
    model,
    tokenizer,
    prompts: Sequence[str],
    kinds: Sequence[str] = (*NORM_KINDS, "layer_output"),
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
    keep_samples: bool = False,
    layout: DecoderLayout | None = None,
    add_special_tokens: bool = False,
) -> ClassStats:
    """Last-token activations at every layer × ``kinds``, accumulated into :class:`ClassStats`.

    Prompts are left-padded so the last position is every prompt's last token. ``layout`` is the
    model's HF module tree (default: the layout table's entry for its architecture). ``add_special_tokens``:
    off for chat-templated prompts (the template places any BOS), on for plain text (as the engine
    tokenizes a text prompt).
    """
    stats = ClassStats(samples={} if keep_samples else None)
    layout = layout or layout_for(model).hf
    layers = layout.layers(model)
    hidden_arg = layout.arg_index("hidden_states")
    captured: dict[tuple[int, str], torch.Tensor] = {}

    def keep(site: tuple[int, str], out: torch.Tensor) -> None:
        captured[site] = out[:, -1, :].detach()

    def grab(site):
        def hook(module, args, output):
            keep(site, output[0] if isinstance(output, tuple) else output)

        return hook

    def grab_input(site):
        def hook(module, args, kwargs):
            keep(
                site, args[hidden_arg] if hidden_arg is not None and len(args) > hidden_arg else kwargs["hidden_states"]
            )

        return hook

    handles = []
    for i, block in enumerate(layers):
        for kind in kinds:
            module = layout.module(block, kind)
            if layout.placement(kind).point == "input":
                handles.append(module.register_forward_pre_hook(grab_input((i, kind)), with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(grab((i, kind))))
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        for start in range(0, len(prompts), batch_size):
            batch = list(prompts[start : start + batch_size])
            enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens)
            model(**enc)
            for site, acts in captured.items():
                stats.add(site, acts)
            stats.count += len(batch)
            if progress:
                progress(len(batch))
    finally:
        tokenizer.padding_side = old_side
        for h in handles:
            h.remove()
    return stats


def diff_of_means(pos: ClassStats, neg: ClassStats, site: tuple[int, str], normalize: bool = True) -> torch.Tensor:
    d = pos.mean(site) - neg.mean(site)
    return d / (d.norm() + 1e-8) if normalize else d


def select_b1(candidates: torch.Tensor) -> tuple[int, torch.Tensor]:
    """``k* = argmax_i mean_j cos(d_i, d_j)`` (diagonal included); returns ``(k*, b1)`` (docs/methods.md §2.4)."""
    unit = candidates / (candidates.norm(dim=-1, keepdim=True) + 1e-8)
    scores = (unit @ unit.T).mean(dim=1)
    k = int(scores.argmax())
    b1 = candidates[k] / (candidates[k].norm() + 1e-8)
    return k, b1


def second_axis(candidates: torch.Tensor, b1: torch.Tensor) -> torch.Tensor:
    """First principal axis of the centred candidates, orthogonalized against ``b1`` (docs/methods.md §2.5).

    The sign follows sklearn's ``svd_flip`` convention (largest-magnitude entry of the
    first left singular vector positive), so it is deterministic.
    """
    centred = candidates - candidates.mean(0, keepdim=True)
    u, _, vh = torch.linalg.svd(centred, full_matrices=False)
    p = vh[0]
    if u[:, 0][u[:, 0].abs().argmax()] < 0:
        p = -p
    p = p - (p @ b1) * b1
    return p / (p.norm() + 1e-8)


def discriminative_layers(
    pos: ClassStats, neg: ClassStats, b1: torch.Tensor, num_layers: int, kinds=NORM_KINDS
) -> list[int]:
    """Blocks whose every norm site has ``mean(â_pos·b1) · mean(â_neg·b1) < 0`` (docs/methods.md §2.6)."""
    kept = []
    for layer in range(num_layers):
        if all(float(pos.mean_unit((layer, k)) @ b1) * float(neg.mean_unit((layer, k)) @ b1) < 0 for k in kinds):
            kept.append(layer)
    return kept


def fit_probe(pos: torch.Tensor, neg: torch.Tensor, held_pos: torch.Tensor, held_neg: torch.Tensor, seed: int = 0):
    """Logistic-regression probe (docs/methods.md §3.9): unit ``coef`` (points to the positive class), held-out accuracy.

    Features are standardized by the training mean only (no scaling), so the
    direction lives in activation space; sklearn defaults otherwise (L2, C = 1).
    """
    require("sklearn", "calibrate", "the probe method")
    from sklearn.linear_model import LogisticRegression

    x = torch.cat([pos, neg]).double()
    y = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))])
    centre = x.mean(0)
    clf = LogisticRegression(max_iter=2000, random_state=seed).fit((x - centre).numpy(), y.numpy())
    coef = torch.from_numpy(clf.coef_[0]).double()
    v = coef / coef.norm()
    if len(held_pos) and len(held_neg):
        hx = torch.cat([held_pos, held_neg]).double() - centre
        hy = torch.cat([torch.ones(len(held_pos)), torch.zeros(len(held_neg))])
        accuracy = float((torch.from_numpy(clf.predict(hx.numpy())) == hy).double().mean())
    else:
        accuracy = float("nan")
    return v.float(), accuracy
