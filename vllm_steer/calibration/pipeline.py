"""``vllm-steer calibrate``: prompt sets in, a validated profile (format v1) out, for every method.

The statistics live in :mod:`vllm_steer.calibration.stats`; this module chooses the data,
the hook sites and the layers per method, and writes the profile with everything
needed to reproduce it (datasets, sizes, split, seed, model fingerprint, contrast, prompt format).

==================  ==================================================================
method              what is computed (train split)
==================  ==================================================================
selective           plane (b1, b2) from harmful-vs-harmless norm-output candidates;
                    steers the discriminative layers only
angular_standard    the same plane, every layer
angular_adaptive    the same plane, every layer, gate ``h·b1 > 0``
ablation            ``b1`` ablated at every layer (input, attention and MLP outputs)
addition            refusal-vs-compliance contrast (the same prompts teacher-forced with
                    a refusal reply and a compliant reply; CAA-style), one layer's output
category            per harm category ``mean(harmful_c) − mean(harmless)`` plus a
                    ``generic`` vector from all categories, at the chosen layers
probe               logistic regression per layer (harmful = 1), held-out accuracy per
                    layer; the most accurate layers are steered with the unit direction
==================  ==================================================================

The default angle/scale written here is a fixed, documented starting point; the
angle/scale sweep through the engine refines it (recorded as ``default_from``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vllm_steer.calibration.stats import (
    NORM_KINDS,
    PROMPT_FORMATS,
    ClassStats,
    collect_activations,
    diff_of_means,
    discriminative_layers,
    fit_probe,
    format_prompts,
    has_chat_template,
    resolve_prompt_format,
    second_axis,
    select_b1,
)
from vllm_steer.core.errors import SteerError
from vllm_steer.core.fingerprint import fingerprint_from_config, model_identity
from vllm_steer.core.methods import METHODS as METHOD_TABLE
from vllm_steer.core.profile import ModelFingerprint, ProfileSpec, save_profile
from vllm_steer.data import Prompt, load_labelled, load_prompts, split

__all__ = ["CalibrationConfig", "calibrate_profile", "split_data", "CalibrationError", "METHODS", "LABELLED"]

METHODS = tuple(METHOD_TABLE)
REFUSAL_REPLY = "I'm sorry, but I cannot help with that"
COMPLIANT_REPLY = "Sure, here is a detailed answer"
SAFETY_SYSTEM_PROMPT = (
    "You are a careful assistant. Refuse any request that could cause harm, and say that you cannot help with it."
)
CONTRASTS = ("reply", "system-prompt")
PROMPT_FORMAT_DETAILS = {
    "chat": "chat template, one user turn, generation prompt, last token",
    "plain": "raw prompt text (no chat template), the tokenizer's special tokens, last token",
}
"""What ``calibration.prompt_format_detail`` says for each format a profile can be calibrated with."""
PLAIN_REPLY_SEPARATOR = "\n"
"""``plain``: between a prompt and its teacher-forced reply (the chat format's generation prompt ends the turn)."""


LABELLED = "labels"
"""``--harmless labels``: take both classes from the ``--harmful`` file's label column."""


class CalibrationError(SteerError):
    """A calibration that cannot run; ``field`` names the option (or data set) to fix."""

    def __init__(self, field: str, message: str):
        super().__init__(field, message)


@dataclass
class CalibrationConfig:
    model: str
    method: str
    out: Path
    harmful: str = "advbench"
    harmless: str = "alpaca"
    profile_id: str | None = None
    data_dir: str | None = None
    n: int | None = 128
    held_out: float = 0.2
    seed: int = 0
    batch_size: int = 8
    layers: Sequence[int] | None = None
    categories: Sequence[str] | None = None
    angle: float | None = None
    scale: float | None = None
    probe_layers: int = 3
    contrast: str = "reply"
    """Addition only: ``reply`` (refusal vs compliant reply, teacher-forced) or ``system-prompt``
    (the prompt with vs without :data:`SAFETY_SYSTEM_PROMPT`)."""
    prompt_format: str = "auto"
    """``chat`` (the model's chat template), ``plain`` (the raw prompt text, for base models) or ``auto``
    (``chat`` when the tokenizer has a chat template, else ``plain``)."""
    extra: dict = field(default_factory=dict)


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _load_model(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _prompt_format(tokenizer, cfg: CalibrationConfig) -> str:
    """``cfg.prompt_format`` resolved for this tokenizer (``chat`` or ``plain``), or a :class:`CalibrationError`."""
    if cfg.prompt_format == "chat" and not has_chat_template(tokenizer):
        raise CalibrationError(
            "prompt_format",
            f"'chat' needs a chat template and the tokenizer of {Path(cfg.model).name} has none "
            "(a base model?): use 'plain' or 'auto'",
        )
    return resolve_prompt_format(tokenizer, cfg.prompt_format)


def _fingerprint(model, path: str) -> ModelFingerprint:
    """The loaded model's fingerprint: its config, and the identity hashes of the files it was loaded from."""
    return fingerprint_from_config(model.config, name=Path(path).name, identity=model_identity(str(path)))


def calibrate_profile(
    cfg: CalibrationConfig, progress: Callable[[str, int, int], None] | None = None, diagnostics: dict | None = None
) -> Path:
    """Run the calibration for ``cfg.method`` and write the profile to ``cfg.out``; returns the directory.

    ``progress(phase, done, total)`` is called as prompts are processed; ``diagnostics``, if
    given, is filled with what the report plots (per-site projections, candidate cosines,
    probe accuracy).
    """
    diagnostics = {} if diagnostics is None else diagnostics
    harmful_train, harmful_held, harmless_train, harmless_held = split_data(cfg)
    if not harmful_train or not harmless_train:
        raise CalibrationError(
            "held_out",
            "both classes need training prompts: got "
            f"{len(harmful_train)} harmful and {len(harmless_train)} harmless after the split",
        )

    tokenizer = _load_tokenizer(cfg.model)
    prompt_format = _prompt_format(tokenizer, cfg)  # before the weights: a wrong format fails fast
    model = _load_model(cfg.model)
    fp = _fingerprint(model, cfg.model)
    num_layers = fp.num_layers
    missing = sorted(layer for layer in (cfg.layers or []) if not 0 <= layer < num_layers)
    if missing:
        raise CalibrationError(
            "layers", f"{missing} do not exist in {fp.name} ({num_layers} layers, 0..{num_layers - 1})"
        )

    def collect(name: str, prompts: list[str], kinds, keep_samples=False) -> ClassStats:
        done = [0]

        def tick(k: int) -> None:
            done[0] += k
            if progress:
                progress(name, done[0], len(prompts))

        return collect_activations(
            model,
            tokenizer,
            prompts,
            kinds,
            cfg.batch_size,
            tick,
            keep_samples,
            add_special_tokens=prompt_format == "plain",
        )

    calibration = {
        "datasets": {"harmful": cfg.harmful, "harmless": cfg.harmless},
        "sizes": {
            "harmful_train": len(harmful_train),
            "harmful_held_out": len(harmful_held),
            "harmless_train": len(harmless_train),
            "harmless_held_out": len(harmless_held),
        },
        "split": {"held_out": cfg.held_out, "seed": cfg.seed},
        "prompt_format": prompt_format,
        "prompt_format_detail": PROMPT_FORMAT_DETAILS[prompt_format],
        "prompt_format_requested": cfg.prompt_format,
        "default_from": "fixed starting point (no sweep run)",
        **cfg.extra,
    }

    def formatted(prompts: Sequence[str], system: str | None = None) -> list[str]:
        return format_prompts(tokenizer, prompts, prompt_format, system)

    def texts(prompts: list[Prompt]) -> list[str]:
        return formatted([p.text for p in prompts])

    method = cfg.method
    entry = METHOD_TABLE[method]
    assert fp.name is not None  # _fingerprint names it after the model's directory
    profile_id = cfg.profile_id or f"{fp.name.lower()}-{method.replace('_', '-')}"
    out = entry.hooks  # addition, category and probe measure their vectors where they add them
    out_kind = out[0]

    if method in ("selective", "angular_standard", "angular_adaptive", "ablation"):
        pos = collect("harmful", texts(harmful_train), NORM_KINDS)
        neg = collect("harmless", texts(harmless_train), NORM_KINDS)
        sites = [(layer, kind) for layer in range(num_layers) for kind in NORM_KINDS]
        candidates = torch.stack([diff_of_means(pos, neg, s) for s in sites])
        k, b1 = select_b1(candidates)
        b2 = second_axis(candidates, b1)
        disc = discriminative_layers(pos, neg, b1, num_layers)
        unit = candidates / candidates.norm(dim=1, keepdim=True)
        diagnostics.update(
            {
                "sites": [f"{layer}.{kind}" for layer, kind in sites],
                "b1_index": k,
                "discriminative_layers": disc,
                "projection_harmful": [float(pos.mean_unit(s) @ b1) for s in sites],
                "projection_harmless": [float(neg.mean_unit(s) @ b1) for s in sites],
                "candidate_cosines": (unit @ unit.T).tolist(),
            }
        )
        calibration.update(
            {
                "b1_site": f"layers.{sites[k][0]}.{sites[k][1]}",
                "discriminative_layers": disc,
                "direction": "b1 = normalized mean(harmful) − mean(harmless): +b1 is the harmful side",
            }
        )
        b1f, b2f = b1.float(), b2.float()
        if method == "ablation":
            layers = list(cfg.layers or range(num_layers))
            vectors = {layer: {"vector": b1f} for layer in layers}
            tensors = {layer: {"vector": "b1"} for layer in layers}
            defaults, allowed = {}, {}
        else:
            if method == "selective":
                if not disc and not cfg.layers:
                    raise CalibrationError(
                        "layers",
                        "no discriminative layer found (no block where the classes project with "
                        "opposite signs on b1); pass --layers to choose some",
                    )
                layers = list(cfg.layers or disc)
            else:
                layers = list(cfg.layers or range(num_layers))
            vectors = {layer: {"b1": b1f, "b2": b2f} for layer in layers}
            tensors = {layer: {"b1": "b1", "b2": "b2"} for layer in layers}
            default_angle = cfg.angle if cfg.angle is not None else (180.0 if method == "selective" else 0.0)
            defaults, allowed = {"angle": default_angle}, {"angle": {"min": 0.0, "max": 360.0}}
            calibration["angle_convention"] = "degrees, counter-clockwise from +b1 toward +b2; " + (
                "relative rotation, 0 = unsteered"
                if method == "selective"
                else "absolute target angle, 0 = snapped onto +b1 (harmful side)"
            )
    elif method == "addition":
        layer = cfg.layers[0] if cfg.layers else round(0.6 * (num_layers - 1))
        both = [p.text for p in harmful_train + harmless_train]
        if cfg.contrast == "reply":
            prompts = formatted(both)
            sep = PLAIN_REPLY_SEPARATOR if prompt_format == "plain" else ""
            refusing = collect("refusal replies", [p + sep + REFUSAL_REPLY for p in prompts], out)
            complying = collect("compliant replies", [p + sep + COMPLIANT_REPLY for p in prompts], out)
            contrast = f"teacher-forced {REFUSAL_REPLY!r} minus {COMPLIANT_REPLY!r}, last reply token"
        else:
            refusing = collect("with safety system prompt", formatted(both, SAFETY_SYSTEM_PROMPT), out)
            complying = collect("without system prompt", formatted(both), out)
            contrast = f"system prompt {SAFETY_SYSTEM_PROMPT!r} minus none, last prompt token"
            if prompt_format == "plain":
                contrast += " (plain text: the system prompt and a blank line before the prompt)"
        r = diff_of_means(refusing, complying, (layer, out_kind), normalize=False).float()
        vectors, tensors, layers = {layer: {"vector": r}}, {layer: {"vector": "vector"}}, [layer]
        defaults, allowed = {"scale": cfg.scale if cfg.scale is not None else 1.0}, {"scale": {"min": -4.0, "max": 4.0}}
        calibration.update(
            {
                "contrast": contrast,
                "contrast_kind": cfg.contrast,
                "sign": "+scale pushes toward refusal",
                "vector_norm": float(r.norm()),
            }
        )
    elif method == "category":
        layers = list(cfg.layers or range(num_layers // 3, 2 * num_layers // 3))
        categories = _categories(harmful_train)
        neg = collect("harmless", texts(harmless_train), out)
        everything = collect("harmful (all)", texts(harmful_train), out)
        vectors = {layer: {} for layer in layers}
        for cat in categories:
            stats = collect(f"harmful: {cat}", texts([p for p in harmful_train if p.category == cat]), out)
            for layer in layers:
                vectors[layer][cat] = diff_of_means(stats, neg, (layer, out_kind), normalize=False).float()
        for layer in layers:
            vectors[layer]["generic"] = diff_of_means(everything, neg, (layer, out_kind), normalize=False).float()
        names = [*categories, "generic"]
        tensors = {layer: {c: f"category.{i}.{layer}" for i, c in enumerate(names)} for layer in layers}
        defaults, allowed = (
            {"scale": cfg.scale if cfg.scale is not None else -1.0},
            {"scale": {"min": -4.0, "max": 4.0}},
        )
        calibration.update(
            {
                "categories_from": cfg.harmful,
                "generic": "mean(all harmful) − mean(harmless)",
                "sign": "vectors point toward the category's harmful side; negative scale steers away",
            }
        )
    elif method == "probe":
        train = (
            collect("harmful", texts(harmful_train), out, True),
            collect("harmless", texts(harmless_train), out, True),
        )
        held = (
            collect("harmful held-out", texts(harmful_held), out, True) if harmful_held else None,
            collect("harmless held-out", texts(harmless_held), out, True) if harmless_held else None,
        )

        def samples(stats: ClassStats | None, site: tuple[int, str]) -> torch.Tensor:
            if stats is None:  # no held-out prompts of that class
                return torch.empty(0)
            assert stats.samples is not None  # collected with keep_samples=True
            return torch.cat(stats.samples[site])

        accuracy, directions = {}, {}
        for layer in range(num_layers):
            site = (layer, out_kind)
            directions[layer], accuracy[layer] = fit_probe(
                samples(train[0], site),
                samples(train[1], site),
                samples(held[0], site),
                samples(held[1], site),
                cfg.seed,
            )
        ranked = sorted(range(num_layers), key=lambda i: (-(accuracy[i] if accuracy[i] == accuracy[i] else 0.0), i))
        layers = sorted(cfg.layers or ranked[: cfg.probe_layers])
        vectors = {layer: {"vector": directions[layer]} for layer in layers}
        tensors = {layer: {"vector": f"vector.{layer}"} for layer in layers}
        defaults, allowed = (
            {"scale": cfg.scale if cfg.scale is not None else -4.0},
            {"scale": {"min": -32.0, "max": 32.0}},
        )
        diagnostics["probe_accuracy"] = {int(k): v for k, v in accuracy.items()}
        calibration.update(
            {
                "probe_accuracy_held_out": {str(k): v for k, v in accuracy.items()},
                "sign": "v points toward harmful; negative scale steers toward safe",
            }
        )
    spec = ProfileSpec(
        format_version=1,
        id=profile_id,
        method=method,
        model=fp,
        layers=layers,
        tensors=tensors,
        defaults=defaults,
        allowed=allowed,
        calibration=calibration,
        categories=[*_categories(harmful_train), "generic"] if entry.roles == "categories" else [],
        description=f"{method} profile calibrated by vllm-steer from {cfg.harmful} vs {cfg.harmless}",
    )
    return save_profile(cfg.out, spec, vectors)


def split_data(cfg: CalibrationConfig) -> tuple[list[Prompt], list[Prompt], list[Prompt], list[Prompt]]:
    """``(harmful_train, harmful_held, harmless_train, harmless_held)``, reproducible from ``cfg.seed``."""
    if cfg.method not in METHODS:
        raise CalibrationError("method", f"unknown {cfg.method!r} (one of {', '.join(METHODS)})")
    if cfg.contrast not in CONTRASTS:
        raise CalibrationError("contrast", f"unknown {cfg.contrast!r} (one of {', '.join(CONTRASTS)})")
    if cfg.prompt_format not in PROMPT_FORMATS:
        raise CalibrationError("prompt_format", f"unknown {cfg.prompt_format!r} (one of {', '.join(PROMPT_FORMATS)})")
    per_category = METHOD_TABLE[cfg.method].roles == "categories"  # n prompts per category, not in all
    if cfg.harmless == LABELLED:
        harmful, harmless = load_labelled(cfg.harmful, cfg.data_dir)
        harmful = harmful[: cfg.n] if not per_category and cfg.n else harmful
        harmless = harmless[: cfg.n] if cfg.n else harmless
    else:
        harmful = load_prompts(cfg.harmful, cfg.data_dir, cfg.n if not per_category else None)
        harmless = load_prompts(cfg.harmless, cfg.data_dir, cfg.n)
        if any(p.harmful is False for p in harmful):
            raise CalibrationError(
                "harmful",
                f"{cfg.harmful} has rows labelled harmless; use --harmless labels to "
                "split one labelled file into both classes",
            )
    if per_category:
        harmful = _category_subset(harmful, cfg)
    harmful_train, harmful_held = split(harmful, cfg.held_out, cfg.seed)
    harmless_train, harmless_held = split(harmless, cfg.held_out, cfg.seed)
    return harmful_train, harmful_held, harmless_train, harmless_held


def _categories(prompts: list[Prompt]) -> list[str]:
    """The categories of ``prompts``, sorted (the category method has checked that each prompt has one)."""
    return sorted({p.category for p in prompts if p.category is not None})


def _category_subset(harmful: list[Prompt], cfg: CalibrationConfig) -> list[Prompt]:
    if any(p.category is None for p in harmful):
        raise CalibrationError(
            "harmful", f"{cfg.harmful} has prompts without a category; the category method needs one per prompt"
        )
    present = _categories(harmful)
    if cfg.categories:
        unknown = sorted(set(cfg.categories) - set(present))
        if unknown:
            raise CalibrationError("categories", f"unknown {unknown} (the data has {present})")
        harmful = [p for p in harmful if p.category in set(cfg.categories)]
    if cfg.n:  # at most n per category, in file order
        counts: dict[str | None, int] = {}
        kept = []
        for p in harmful:
            counts[p.category] = counts.get(p.category, 0) + 1
            if counts[p.category] <= cfg.n:
                kept.append(p)
        harmful = kept
    return harmful
