"""Angle / scale sweep through the engine: every grid point is a row of ONE mixed batch.

For a profile and held-out harmful and harmless prompts, each grid value
(an angle for rotation methods, a scale for additive ones) plus an unsteered
baseline is generated greedily in a single ``LLM.generate`` call — per-request
steering makes the sweep one batch instead of one run per angle — and scored
with the §5 metrics: substring refusal rate on both sets, perplexity of the
steered generation (its own logprobs), compression ratio, Unicode score.

The default it picks steers *toward refusal* (the direction the default model
allows): maximize ``refusal(harmful) − refusal(harmless)`` over coherent points
(average perplexity ≤ ``max(2.0, 1.25 × unsteered)``), ties to the point nearest
the identity. If no point raises refusal, the profile keeps its default and the
sweep says so.

Prompts are formatted as the calibration formatted them (``calibration.prompt_format`` of the profile:
the chat template, or the raw text for a base model), so the sweep generates from the same prompts the
directions were measured on.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from vllm_steer.calibration.stats import format_prompts, resolve_prompt_format
from vllm_steer.core.methods import METHODS, method_label, parameter_of
from vllm_steer.core.profile import load_profile, save_profile
from vllm_steer.evaluation.metrics import (
    PERPLEXITY_VIOLATION,
    compression_ratio,
    is_refusal,
    perplexity_from_logprobs,
    token_logprobs,
    unicode_score,
)

__all__ = [
    "SweepPoint",
    "parse_grid",
    "default_grid",
    "run_sweep",
    "choose_default",
    "record_sweep",
    "recorded_prompt_format",
]


@dataclass
class SweepPoint:
    value: float | None  # None = unsteered baseline
    refusal_harmful: float
    refusal_harmless: float
    perplexity: float
    compression_ratio: float
    unicode_score: float
    example: str


def parse_grid(text: str) -> list[float]:
    """``"0:360:10"`` (start:stop:step, stop excluded) or ``"0.5,1,2"``."""
    if ":" in text:
        start, stop, step = (float(x) for x in text.split(":"))
        if step <= 0:
            raise ValueError("sweep step must be positive")
        n = math.floor((stop - start) / step + 1e-9)
        return [start + i * step for i in range(n)]
    return [float(x) for x in text.split(",") if x.strip()]


def default_grid(method: str, text: str | None = None) -> list[float]:
    """The grid a sweep of ``method`` runs: ``text`` (``"auto"`` or ``None``: the method's default grid), mirrored
    to negative values for methods that steer away from harm with negative scales (the method table says which)."""
    entry = METHODS[method]
    if entry.sweep is None:
        raise ValueError(f"method {method!r} has no angle or scale to sweep")
    grid = parse_grid(entry.sweep if text in (None, "auto") else text)
    if entry.sweep_mirrored:
        grid = sorted({*grid, *(-g for g in grid)})
    return grid


def _parameter(method: str | None) -> str:
    parameter = parameter_of(method)
    if parameter is None:
        raise ValueError(f"{method_label(method)} has no angle or scale to sweep")
    return parameter


def run_sweep(
    llm,
    profile_id: str,
    method: str,
    grid: Sequence[float],
    harmful: Sequence[str],
    harmless: Sequence[str],
    max_tokens: int = 32,
    prompt_format: str = "chat",
) -> list[SweepPoint]:
    """Generate the whole grid (and an unsteered baseline) in one call on an engine with the profile loaded.

    ``prompt_format``: ``chat`` (the chat template, one user turn), ``plain`` (the raw prompt text) or
    ``auto`` (``chat`` when the engine's tokenizer has a template), as in the calibration."""
    from vllm import SamplingParams

    key = f"steer_{_parameter(method)}"
    tokenizer = llm.get_tokenizer()
    prompt_format = resolve_prompt_format(tokenizer, prompt_format)
    formatted = {
        kind: format_prompts(tokenizer, group, prompt_format)
        for kind, group in (("harmful", harmful), ("harmless", harmless))
    }

    values: list[float | None] = [None, *grid]
    prompts, params, index = [], [], []
    for vi, value in enumerate(values):
        extra = None if value is None else {"steer_profile": profile_id, key: float(value)}
        for kind, group in formatted.items():
            for p in group:
                prompts.append(p)
                params.append(SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=1, extra_args=extra))
                index.append((vi, kind))
    outputs = llm.generate(prompts, params)
    points = []
    for vi, value in enumerate(values):
        rows = [(kind, o.outputs[0]) for (i, kind), o in zip(index, outputs, strict=True) if i == vi]
        texts = {k: [c.text for kk, c in rows if kk == k] for k in ("harmful", "harmless")}
        ppl = [perplexity_from_logprobs(token_logprobs(c.token_ids, c.logprobs)) for _, c in rows]
        all_texts = texts["harmful"] + texts["harmless"]
        points.append(
            SweepPoint(
                value=value,
                refusal_harmful=_mean([is_refusal(t) for t in texts["harmful"]]),
                refusal_harmless=_mean([is_refusal(t) for t in texts["harmless"]]),
                perplexity=_mean(ppl),
                compression_ratio=_mean([compression_ratio(t) for t in all_texts]),
                unicode_score=_mean([unicode_score(t) for t in all_texts]),
                example=(texts["harmful"] or texts["harmless"])[0][:200],
            )
        )
    return points


def recorded_prompt_format(calibration: dict) -> str:
    """The prompt format a profile was calibrated with: ``calibration.prompt_format`` when it is ``chat`` or
    ``plain``; profiles from before the option recorded a description of the chat format there."""
    recorded = calibration.get("prompt_format")
    return recorded if recorded in ("chat", "plain") else "chat"


def _mean(xs) -> float:
    xs = [float(x) for x in xs if x == x]
    return sum(xs) / len(xs) if xs else float("nan")


def choose_default(points: Sequence[SweepPoint], method: str) -> tuple[SweepPoint | None, str]:
    baseline = next(p for p in points if p.value is None)
    limit = max(PERPLEXITY_VIOLATION, 1.25 * baseline.perplexity)
    coherent = [p for p in points if p.value is not None and p.perplexity <= limit]

    def distance(p: SweepPoint) -> float:
        v = p.value
        assert v is not None  # coherent points are steered ones
        return min(v % 360, 360 - v % 360) if METHODS[method].parameter == "angle" else abs(v)

    def gain(p: SweepPoint) -> float:
        return (p.refusal_harmful - p.refusal_harmless) - (baseline.refusal_harmful - baseline.refusal_harmless)

    best = sorted(coherent, key=lambda p: (-gain(p), -p.refusal_harmful, distance(p)))
    if not best or gain(best[0]) <= 0:
        return None, f"no coherent point (perplexity <= {limit:.2f}) raised refusal above the unsteered baseline"
    return best[0], (
        f"max refusal(harmful) - refusal(harmless) over points with perplexity <= {limit:.2f} "
        "(max(2.0, 1.25 x unsteered)); ties to the point nearest the identity"
    )


def record_sweep(
    profile_dir: Path,
    points: Sequence[SweepPoint],
    chosen: SweepPoint | None,
    criterion: str,
    sizes: dict,
    max_tokens: int,
    prompt_format: str | None = None,
) -> None:
    """Write the sweep into the profile's metadata and, if one was chosen, its default."""
    profile = load_profile(profile_dir)
    spec = profile.spec
    calibration = dict(spec.calibration)
    parameter = _parameter(spec.method)
    calibration["sweep"] = {
        "parameter": parameter,
        "points": [asdict(p) for p in points],
        "criterion": criterion,
        "prompts": sizes,
        "max_tokens": max_tokens,
        "chosen": None if chosen is None else chosen.value,
        "served_in_one_mixed_batch": True,
    }
    if prompt_format is not None:
        calibration["sweep"]["prompt_format"] = prompt_format
    defaults = spec.defaults.model_copy()
    if chosen is not None:
        if chosen.value is None:
            raise ValueError("the chosen point must be a steered one, not the unsteered baseline")
        setattr(defaults, parameter, float(chosen.value))
        calibration["default_from"] = "sweep"
    new_spec = spec.model_copy(update={"calibration": calibration, "defaults": defaults})
    save_profile(profile_dir, new_spec, profile.vectors, profile.gate_vectors)


def sweep_profile_dir(
    profile_dir: Path,
    model: str,
    grid: Sequence[float],
    harmful: Sequence[str],
    harmless: Sequence[str],
    max_tokens: int = 32,
    eager: bool = True,
    prompt_format: str | None = None,
):
    """Start an engine with just this profile, sweep, record; returns (points, chosen, criterion).

    ``prompt_format`` (``chat``, ``plain``, ``auto``) defaults to the one the profile was calibrated with."""

    from vllm_steer.engine import offline_engine, shutdown_engine

    profile = load_profile(profile_dir)
    method = profile.spec.method_spec.name  # refuses a gate-only profile
    _parameter(method)  # refuses a method with nothing to sweep
    if prompt_format is None:
        prompt_format = recorded_prompt_format(profile.spec.calibration)
    root = Path(tempfile.mkdtemp(prefix="vllm-steer-sweep-"))
    try:
        shutil.copytree(profile_dir, root / profile.id)
        llm = offline_engine(model, str(root), eager=eager, max_num_seqs=64)
        try:
            prompt_format = resolve_prompt_format(llm.get_tokenizer(), prompt_format)
            points = run_sweep(llm, profile.id, method, grid, harmful, harmless, max_tokens, prompt_format)
        finally:
            shutdown_engine(llm)
            del llm
    finally:
        shutil.rmtree(root, ignore_errors=True)
    chosen, criterion = choose_default(points, method)
    record_sweep(
        profile_dir,
        points,
        chosen,
        criterion,
        {"harmful": len(harmful), "harmless": len(harmless)},
        max_tokens,
        prompt_format,
    )
    return points, chosen, criterion
