"""Gate calibration (``vllm-steer calibrate --gate``): prompt sets in, a profile's ``gating`` block out.

A gate (:mod:`vllm_steer.core.gates`, ``docs/methods.md`` §3.11) reads one direction at one layer's output on
the prompt's last token. This module chooses the gates honestly (``docs/methods.md`` §2.9):

* every source (harmful: AdvBench, HarmBench, CatQA, XSTest-unsafe; harmless: Alpaca, XSTest-safe by default)
  is split, seeded and on its own, into three disjoint parts: **fit** (directions), **select** (the grid search
  and the thresholds) and **test** (the reported rates; never used to choose anything);
* candidate directions per layer are differences of means on the fit part, with every source weighted alike
  (the mean of the per-source means), so no one source — and no one prompt style — dominates: one *pooled*
  direction (all harmful sources against all harmless ones) and one *per-source* direction per harmful source;
* CAST's grid search on the select part, over layer × score (``cast``, ``projection``) × comparison: the
  threshold is the most permissive one that keeps the false-positive rate of **every** harmless source at or
  below its target, then the recall (the mean over harmful sources of the share flagged) decides; ties go to
  the AUC. Two gatings compete: the best pooled gate alone, and the OR of the best gate per harmful source
  (CAST's multi-conditioning), whose thresholds are set together so that the OR's false-positive rate meets
  the targets;
* the test part then gives the flag rate per source of the chosen gating.

*Routing* (``--gate-route``, category profiles): every category of the profile that the labelled data covers is a
routing source of its own (split in three like any source). The *deciding* gates are, by default, the best pooled
gate over those sources (``mean`` or ``probe`` as above, every category weighing alike); with ``--gate-route-from``
the router learns from those sets and the deciding gates are chosen as above from the harmful sources, less the
prompts the router holds (:func:`load_route_sources`). The *routing* gates, one
per category, are a nearest-centroid router (:func:`fit_router`): per layer, each category's direction is its
fit-part mean minus the mean of the category means (one-vs-rest, centred), scored by ``projection``, its
threshold the categories' balanced mean score on the fit part; the row routes to the largest ``score −
threshold`` (:func:`~vllm_steer.core.gates.route_of`), and the select part chooses the layer by routing
accuracy. The test part gives, per category, the share gated, where the rows route (accuracy and a confusion
table), and, per harmless source, the share gated.

Everything after the activations is pure tensor arithmetic (:func:`calibrate_gating`), so the tests plant a
direction in synthetic activations; :func:`run_gate_calibration` runs the model and :func:`add_gating` writes
the result into a profile directory.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from vllm_steer.calibration.pipeline import CalibrationError, _fingerprint, _load_model, _load_tokenizer
from vllm_steer.calibration.stats import collect_activations, format_prompts, resolve_prompt_format
from vllm_steer.core.errors import field_and_message
from vllm_steer.core.extras import require
from vllm_steer.core.gates import (
    GATE_ACTIONS,
    GATE_HOOK,
    GATE_SCORES,
    MAX_GATES,
    GateSpec,
    GatingSpec,
    fired_gates,
    gate_score,
    route_of,
)
from vllm_steer.core.profile import ModelFingerprint, ProfileSpec, load_profile, save_profile
from vllm_steer.data import NAMED_SETS, DatasetError, Prompt, load_prompts

__all__ = [
    "DEFAULT_HARMFUL",
    "DEFAULT_HARMLESS",
    "DEFAULT_FRACTIONS",
    "DEFAULT_PROBE_C",
    "GateCalibrationConfig",
    "SPLITS",
    "COMPARISONS",
    "GateSource",
    "GateConfig",
    "GridRow",
    "GatingResult",
    "parse_sources",
    "parse_fractions",
    "parse_fpr",
    "split_three",
    "source_labels",
    "budgets_for",
    "load_sources",
    "load_route_sources",
    "recorded_sources",
    "route_categories",
    "collect_gate_activations",
    "fit_directions",
    "Router",
    "fit_router",
    "layer_scores",
    "balanced_auc",
    "common_thresholds",
    "or_thresholds",
    "direction_target",
    "grid_search",
    "calibrate_gating",
    "run_gate_calibration",
    "add_gating",
    "write_gate_only_profile",
    "gating_record",
]

DEFAULT_HARMFUL: tuple[str, ...] = ("advbench", "harmbench", "catqa", "xstest-unsafe")
DEFAULT_HARMLESS: tuple[str, ...] = ("alpaca", "xstest-safe")
SPLITS: tuple[str, ...] = ("fit", "select", "test")
DEFAULT_FRACTIONS: tuple[float, float, float] = (0.4, 0.3, 0.3)
COMPARISONS: tuple[str, ...] = (">", "<")
POOLED = "pooled"
PER_SOURCE = "per-source"
DEFAULT_PROBE_C: tuple[float, ...] = (0.01, 0.1, 1.0)
"""The probe directions' inverse L2 strengths (a grid dimension: the select part chooses)."""
POOLED_GATE = "harmful"
"""The name of the pooled gate (and of its direction set)."""
GENERIC = "generic"
"""The category profiles' pooled vector: no gate routes to it."""
NO_ROUTE = "none"
"""The routing confusion table's column for rows not gated (no deciding gate fired)."""
ROUTE_SCORE = "projection"
"""The routing gates' score: signed, so the largest margin points at the nearest category."""
_ROC_POINTS = 200

Activations = Mapping[str, Mapping[str, torch.Tensor]]
"""source → split (:data:`SPLITS`) → ``[n, L, d]`` last-prompt-token activations at every layer's output."""


# ----------------------------------------------------------------------------------------- data and splits


@dataclass(frozen=True)
class GateSource:
    """One prompt set, its class, and its three disjoint parts."""

    name: str
    """The label in reports and, for per-source gates, the gate's name."""
    harmful: bool
    fit: tuple[Prompt, ...]
    select: tuple[Prompt, ...]
    test: tuple[Prompt, ...]
    origin: str = ""
    """What the user named (a set name or a file path)."""

    def part(self, split: str) -> tuple[Prompt, ...]:
        return {"fit": self.fit, "select": self.select, "test": self.test}[split]


def parse_sources(text: str | Sequence[str], option: str) -> list[str]:
    """A comma-separated list of named sets or files (``option`` names the flag in errors)."""
    items = [s.strip() for s in (text.split(",") if isinstance(text, str) else text)]
    items = [s for s in items if s]
    if not items:
        raise CalibrationError(option, "give at least one prompt set (a named set or a CSV/JSONL file)")
    if len(set(items)) != len(items):
        raise CalibrationError(option, f"a set is named twice in {items}")
    return items


def parse_fractions(text: str | Sequence[float]) -> tuple[float, float, float]:
    """``"0.4,0.3,0.3"``: the fit, select and test shares of every source (positive, summing to 1)."""
    try:
        parts = [float(x) for x in (text.split(",") if isinstance(text, str) else text)]
    except ValueError:
        raise CalibrationError("gate_split", f"{text!r} is not three comma-separated numbers") from None
    if len(parts) != 3 or any(not (0.0 < p < 1.0) for p in parts) or abs(sum(parts) - 1.0) > 1e-6:
        raise CalibrationError("gate_split", f"{text!r}: three shares (fit, select, test), each in (0, 1), sum 1")
    return parts[0], parts[1], parts[2]


def parse_fpr(text: str | float, harmless: Sequence[str]) -> dict[str, float]:
    """The false-positive target per harmless source: ``"0.01"`` (every source), or ``"0.01,xstest-safe=0.2"``
    (a default and per-source exceptions; a bare number is the default for the sources not named)."""
    default: float | None = None
    named: dict[str, float] = {}
    for item in [s.strip() for s in str(text).split(",") if s.strip()]:
        key, sep, value = item.rpartition("=")
        try:
            rate = float(value)
        except ValueError:
            raise CalibrationError("gate_fpr", f"{item!r} is not a rate (0.01) or SOURCE=RATE") from None
        if not (0.0 <= rate < 1.0) or math.isnan(rate):
            raise CalibrationError("gate_fpr", f"{item!r}: a false-positive rate is in [0, 1)")
        if not sep:
            default = rate
        elif key not in harmless:
            raise CalibrationError("gate_fpr", f"{key!r} is not a harmless source (those are {list(harmless)})")
        else:
            named[key] = rate
    missing = [s for s in harmless if s not in named]
    if missing and default is None:
        raise CalibrationError("gate_fpr", f"no rate for {missing}: give a default rate (e.g. 0.01)")
    return {s: named.get(s, default if default is not None else 0.0) for s in harmless}


def split_three(
    prompts: Sequence[Prompt], fractions: Sequence[float], seed: int, name: str
) -> tuple[list[Prompt], list[Prompt], list[Prompt]]:
    """``(fit, select, test)``: a seeded shuffle of one source (the source's name is part of the seed, so sources
    are shuffled independently), cut at the fractions; each part keeps file order and gets at least one prompt."""
    n = len(prompts)
    if n < 3:
        raise CalibrationError("gate_n", f"{name}: {n} prompt(s); a gate source needs at least 3 (fit, select, test)")
    order = list(range(n))
    random.Random(f"vllm-steer-gate:{seed}:{name}").shuffle(order)
    n_fit = min(max(1, round(n * fractions[0])), n - 2)
    n_select = min(max(1, round(n * fractions[1])), n - n_fit - 1)
    cuts = (order[:n_fit], order[n_fit : n_fit + n_select], order[n_fit + n_select :])
    fit, select, test = ([prompts[i] for i in sorted(part)] for part in cuts)
    return fit, select, test


def source_labels(origins: Sequence[str]) -> list[str]:
    """The label of each source, in order: a named set's name, or a file's stem made gate-name-safe and unique
    (never :data:`POOLED_GATE`, the pooled gate's name)."""
    taken = {POOLED_GATE}
    return [_unique(_slug(origin if origin in NAMED_SETS else Path(origin).stem), taken) for origin in origins]


def _slug(text: str) -> str:
    """``text`` made gate-name-safe (``^[a-z0-9][a-z0-9._-]{0,63}$``, at most 48 characters before a suffix)."""
    return re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-._")[:48] or "source"


def _unique(base: str, taken: set[str]) -> str:
    """``base``, or ``base-2``, ``base-3``... whichever is not ``taken`` yet (it is then)."""
    label, i = base, 2
    while label in taken:
        label, i = f"{base}-{i}", i + 1
    taken.add(label)
    return label


def budgets_for(
    fpr: str | float | Mapping[str, float], harmful: Sequence[str], harmless: Sequence[str]
) -> dict[str, float]:
    """The false-positive target per harmless source label (:func:`parse_fpr`); a source may be named by what the
    user passed (a file path) or by its label."""
    labels = source_labels([*harmful, *harmless])
    by_origin = dict(zip([*harmful, *harmless], labels, strict=True))
    harmless_labels = labels[len(harmful) :]
    if isinstance(fpr, Mapping):
        budgets = {by_origin.get(k, k): float(v) for k, v in fpr.items()}
        unknown = sorted(set(budgets) - set(harmless_labels))
        missing = sorted(set(harmless_labels) - set(budgets))
        if unknown or missing:
            raise CalibrationError(
                "gate_fpr", f"targets for {sorted(budgets)}, the harmless sources are {harmless_labels}"
            )
        return budgets
    items = []
    for item in str(fpr).split(","):
        key, sep, value = item.strip().rpartition("=")
        items.append(f"{by_origin.get(key, key)}={value}" if sep else item)
    return parse_fpr(",".join(items), harmless_labels)


def load_sources(
    harmful: Sequence[str],
    harmless: Sequence[str],
    data_dir: str | None = None,
    n: int | None = None,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
    exclude: Collection[str] = frozenset(),
) -> list[GateSource]:
    """Every source's prompts (the first ``n`` in file order; all when ``None``), split in three. Harmful prompts
    whose text is in ``exclude`` (those a router learns from) are left out before the first ``n`` are taken.

    A harmful source with rows labelled harmless (``xstest``), or the reverse, is refused: name the labelled
    half (``xstest-unsafe``, ``xstest-safe``)."""
    labels = source_labels([*harmful, *harmless])
    return [
        *_load_side(harmful, labels[: len(harmful)], True, data_dir, n, fractions, seed, exclude),
        *_load_side(harmless, labels[len(harmful) :], False, data_dir, n, fractions, seed),
    ]


def _load_side(
    origins: Sequence[str],
    labels: Sequence[str],
    is_harmful: bool,
    data_dir: str | None,
    n: int | None,
    fractions: Sequence[float],
    seed: int,
    exclude: Collection[str] = frozenset(),
) -> list[GateSource]:
    """The sources of one class: each origin's prompts less ``exclude``, the first ``n``, split in three."""
    out = []
    for origin, label in zip(origins, labels, strict=True):
        loaded = _load_class(origin, is_harmful, data_dir, None)
        kept = [p for p in loaded if p.text not in exclude]
        if len(kept) < 3 and len(kept) < len(loaded):
            raise CalibrationError(
                "gate_harmful",
                f"{origin}: {len(kept)} prompt(s) left once the {len(loaded) - len(kept)} the router learns from are "
                "taken out; a gate source needs at least 3 (route fewer per category with --gate-route-n, or leave "
                "it out of --gate-harmful)",
            )
        out.append(_gate_source(label, is_harmful, kept[:n] if n else kept, fractions, seed, origin))
    return out


def _load_class(origin: str, is_harmful: bool, data_dir: str | None, n: int | None) -> list[Prompt]:
    """One source's prompts (the first ``n``), refused if any row is labelled with the other class."""
    option = "gate_harmful" if is_harmful else "gate_harmless"
    try:
        prompts = load_prompts(origin, data_dir, n)
    except DatasetError as exc:
        raise CalibrationError(option, str(exc)) from None
    wrong = [p for p in prompts if p.harmful is (not is_harmful)]
    if wrong:
        other = "harmless" if is_harmful else "harmful"
        raise CalibrationError(option, f"{origin} has {len(wrong)} row(s) labelled {other}; name only one class of it")
    return prompts


def _gate_source(
    label: str, is_harmful: bool, prompts: Sequence[Prompt], fractions: Sequence[float], seed: int, origin: str
) -> GateSource:
    fit, select, test = split_three(prompts, fractions, seed, label)
    return GateSource(label, is_harmful, tuple(fit), tuple(select), tuple(test), origin)


def route_categories(categories: Sequence[str]) -> list[str]:
    """The categories of a category profile that routing gates may route to: all but :data:`GENERIC`."""
    return [c for c in categories if c != GENERIC]


def load_route_sources(
    harmful: Sequence[str],
    harmless: Sequence[str],
    categories: Sequence[str],
    data_dir: str | None = None,
    n: int | None = None,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
    route_from: Sequence[str] | None = None,
    route_n: int | None = None,
) -> tuple[list[GateSource], dict[str, str]]:
    """The sources of a routing calibration. Returns ``(sources, routes)``, ``routes`` the category of each
    routing source's label.

    Routing sources: one per category of ``categories`` (the profile's, :func:`route_categories`) that the
    labelled sets ``route_from`` (default: ``harmful``) label with at least 3 prompts — its prompts from every
    such set, the first ``route_n`` (default ``n``) in file order per category, as the category method counts —
    labelled by a gate-name-safe slug of the category. Rows without a category, or with one the profile lacks,
    are left out; none left is an error (``gate_route``).

    Without ``route_from`` the deciding gate learns from the routing sources (they are the harmful sources).
    With it, the harmful sources are ``harmful`` as :func:`load_sources` loads them, less every prompt a routing
    source holds (a prompt is in one source only, so no test prompt of one was fitted on by the other). Then
    the harmless sources."""
    wanted = route_categories(categories)
    sets = list(route_from) if route_from is not None else list(harmful)
    per_category = route_n if route_from is not None and route_n is not None else n
    by_category: dict[str, list[Prompt]] = {c: [] for c in wanted}
    origins: dict[str, list[str]] = {c: [] for c in wanted}
    seen: set[str] = set()
    for origin in sets:
        for p in _load_class(origin, True, data_dir, None):
            if p.category is not None:
                seen.add(p.category)
            if p.category in by_category:
                by_category[p.category].append(p)
                if origin not in origins[p.category]:
                    origins[p.category].append(origin)
    option = "gate_route_from" if route_from is not None else "gate_route"
    covered = [c for c in wanted if len(by_category[c]) >= 3]
    if not covered:
        have = sorted(seen)
        raise CalibrationError(
            option,
            f"no category of the profile ({wanted or 'it has none but generic'}) labels 3 or more prompts of "
            f"{sets} (their categories: {have[:12] if have else 'none'}{' ...' if len(have) > 12 else ''});"
            " name labelled harmful sets with " + ("--gate-route-from" if route_from is not None else "--gate-harmful"),
        )
    if len(covered) < 2 or len(covered) >= MAX_GATES:
        raise CalibrationError(
            option,
            f"{len(covered)} categories to route ({covered}): routing needs 2 to {MAX_GATES - 1} (a gating holds "
            f"{MAX_GATES} gates, one of them deciding)",
        )
    labels = source_labels([*harmful, *harmless])
    taken = {POOLED_GATE, *labels}
    routed, routes = [], {}
    for c in covered:
        label = _unique(_slug(c), taken)
        prompts = by_category[c][:per_category] if per_category else by_category[c]
        routed.append(_gate_source(label, True, prompts, fractions, seed, f"{'+'.join(origins[c])}: {c}"))
        routes[label] = c
    if route_from is not None:
        used = frozenset(p.text for s in routed for p in (*s.fit, *s.select, *s.test))
        deciding = _load_side(harmful, labels[: len(harmful)], True, data_dir, n, fractions, seed, used)
    else:
        deciding = []
    safe = _load_side(harmless, labels[len(harmful) :], False, data_dir, n, fractions, seed)
    return [*deciding, *routed, *safe], routes


def recorded_sources(
    spec: ProfileSpec, data_dir: str | None = None, n: int | None = None
) -> tuple[list[GateSource], dict[str, str]]:
    """The sources a profile's gates were calibrated on, split as calibration split them (its
    ``calibration.gating`` record: the sets, shares, seed and counts), so that a test part can be run again.
    Returns ``(sources, routes)`` as :func:`load_route_sources` does (``routes`` empty without routing gates).
    ``n``: the first ``n`` prompts per source instead of the recorded count."""
    record = spec.calibration.get("gating")
    if spec.gating is None or not record:
        raise CalibrationError("profile", f"profile {spec.id!r} has no calibrated gates (calibration.gating)")
    origins, split = record.get("origins", {}), record["split"]
    names = record["sources"]

    def sets(labels: Sequence[str]) -> list[str]:
        return [origins.get(label, label) for label in labels]

    harmless = sets(names["harmless"])
    fractions, seed = split["fractions"], split["seed"]
    if "routes" not in record:
        count = n or split.get("n_per_source")
        return load_sources(sets(names["harmful"]), harmless, data_dir, count, fractions, seed), {}
    route_sets = record.get("route_sets") or list(
        dict.fromkeys(x for o in sets(names["harmful"]) for x in o.split(": ", 1)[0].split("+"))
    )
    per_category = n or split.get("n_per_category")
    if names.get("routing", names["harmful"]) == names["harmful"]:  # the categories were the harmful sources
        return load_route_sources(route_sets, harmless, spec.categories, data_dir, per_category, fractions, seed)
    harmful = sets(names["harmful"])
    per_source = n or split.get("n_per_source")
    return load_route_sources(
        harmful, harmless, spec.categories, data_dir, per_source, fractions, seed, route_sets, per_category
    )


# ------------------------------------------------------------------------------------------- activations


def collect_gate_activations(
    model,
    tokenizer,
    sources: Sequence[GateSource],
    prompt_format: str,
    batch_size: int = 8,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """:data:`Activations` of every source and split: the last prompt token at every layer's output
    (:func:`~vllm_steer.calibration.stats.collect_activations`, hook kind ``layer_output``), prompts formatted
    as the calibration formats them (``chat`` or ``plain``, resolved)."""
    num_layers = int(model.config.num_hidden_layers)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for source in sources:
        out[source.name] = {}
        for split in SPLITS:
            prompts = [p.text for p in source.part(split)]
            tick = _ticker(progress, f"gate: {source.name} ({split})", len(prompts))
            stats = collect_activations(
                model,
                tokenizer,
                format_prompts(tokenizer, prompts, prompt_format),
                (GATE_HOOK,),
                batch_size,
                tick,
                keep_samples=True,
                add_special_tokens=prompt_format == "plain",
            )
            assert stats.samples is not None  # keep_samples=True
            out[source.name][split] = torch.stack(
                [torch.cat(stats.samples[(layer, GATE_HOOK)]) for layer in range(num_layers)], dim=1
            )
    return out


def _ticker(progress: Callable[[str, int, int], None] | None, phase: str, total: int) -> Callable[[int], None]:
    done = [0]

    def tick(k: int) -> None:
        done[0] += k
        if progress:
            progress(phase, done[0], total)

    return tick


# ------------------------------------------------------------------------------------ directions, scores


def _balanced_mean(acts: Sequence[torch.Tensor]) -> torch.Tensor:
    """The mean of per-source means (``[L, d]``): every source weighs the same, whatever its size."""
    return torch.stack([a.double().mean(0) for a in acts]).mean(0)


def _unit(v: torch.Tensor) -> torch.Tensor:
    return (v / (v.norm(dim=-1, keepdim=True) + 1e-8)).float()


def direction_target(name: str) -> str:
    """The target of a direction set ``"<kind>:<target>"``: :data:`POOLED_GATE` or one harmful source."""
    return name.split(":", 1)[1]


def _probe_directions(
    positive: Sequence[torch.Tensor], negative: Sequence[torch.Tensor], c: float, seed: int
) -> torch.Tensor:
    """``[L, d]`` unit logistic-regression directions (harmful = 1), one per layer: features standardized, every
    source weighing the same (sample weight 1 / its source's size, each class half), L2 with inverse strength
    ``c``; the coefficients are mapped back to activation space (divided by the feature scale)."""
    require("sklearn", "calibrate", "gate calibration (probe directions)")
    from sklearn.linear_model import LogisticRegression

    parts = [*positive, *negative]
    x_all = torch.cat(parts).double()  # [n, L, d]
    y = torch.cat([torch.full((len(a),), float(i < len(positive))) for i, a in enumerate(parts)]).numpy()
    weights = torch.cat(
        [
            torch.full((len(a),), 1.0 / (len(a) * (len(positive) if i < len(positive) else len(negative))))
            for i, a in enumerate(parts)
        ]
    )
    w = (weights / weights.mean()).numpy()
    out = []
    for layer in range(x_all.shape[1]):
        x = x_all[:, layer]
        mu, sd = x.mean(0), x.std(0) + 1e-6
        clf = LogisticRegression(C=c, max_iter=3000, random_state=seed)
        clf.fit(((x - mu) / sd).numpy(), y, sample_weight=w)
        out.append(torch.from_numpy(clf.coef_[0]).double() / sd)
    return _unit(torch.stack(out))


def fit_directions(
    acts: Activations,
    harmful: Sequence[str],
    harmless: Sequence[str],
    probe_c: Sequence[float] = (),
    seed: int = 0,
    per_source: bool | None = None,
    tick: Callable[[int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Unit candidate directions per layer (``[L, d]``) from the fit parts, named ``"<kind>:<target>"``.

    ``mean:harmful``: the mean of the harmful sources' means minus the mean of the harmless sources' means;
    ``mean:<source>``, per harmful source: that source's mean minus the harmless sources' balanced mean.
    With ``probe_c``, also ``probe-c<C>:harmful`` and ``probe-c<C>:<source>``: source-balanced logistic
    regressions (:func:`_probe_directions`), one per inverse regularization strength ``C``. ``per_source``
    (default: with more than one harmful source) adds the per-source sets; routing leaves them out. ``tick(1)``
    after each set."""
    if per_source is None:
        per_source = len(harmful) > 1
    negative = _balanced_mean([acts[s]["fit"] for s in harmless])
    neg_fit = [acts[s]["fit"] for s in harmless]
    sources = list(harmful) if per_source else []
    directions: dict[str, torch.Tensor] = {}
    directions[f"mean:{POOLED_GATE}"] = _unit(_balanced_mean([acts[s]["fit"] for s in harmful]) - negative)
    for s in sources:
        directions[f"mean:{s}"] = _unit(acts[s]["fit"].double().mean(0) - negative)
    if tick:
        tick(len(directions))
    for c in probe_c:
        directions[f"probe-c{c:g}:{POOLED_GATE}"] = _probe_directions(
            [acts[s]["fit"] for s in harmful], neg_fit, c, seed
        )
        if tick:
            tick(1)
        for s in sources:
            directions[f"probe-c{c:g}:{s}"] = _probe_directions([acts[s]["fit"]], neg_fit, c, seed)
            if tick:
                tick(1)
    return directions


def _direction_count(harmful: Sequence[str], probe_c: Sequence[float], per_source: bool) -> int:
    """How many direction sets :func:`fit_directions` fits (the progress bar's total)."""
    sets = 1 + (len(harmful) if per_source else 0)
    return sets * (1 + len(probe_c))


@dataclass
class Router:
    """The routing gates' nearest-centroid router (:func:`fit_router`) at its chosen layer."""

    layer: int
    directions: dict[str, torch.Tensor]
    """Category source → ``[d]`` unit direction (its fit mean minus the mean of the category means)."""
    thresholds: dict[str, float]
    """Category source → the categories' balanced mean ``projection`` score on the fit part."""
    grid: list[dict[str, Any]]
    """Per layer: ``layer``, ``fit`` and ``select`` routing accuracy (mean over categories)."""


def _router_at(fit: Sequence[torch.Tensor], layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[K, d]`` unit one-vs-rest directions and ``[K]`` thresholds of ``K`` categories at one layer."""
    means = torch.stack([a[:, layer].double().mean(0) for a in fit])
    directions = _unit(means - means.mean(0))
    scores = [_projection(a[:, layer], directions).double().mean(0) for a in fit]
    thresholds = torch.stack(scores).mean(0).float()
    return directions, thresholds


def _projection(h: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """``[n, K]``: :func:`~vllm_steer.core.gates.gate_score` ``projection`` of ``h`` ``[n, d]`` on each of
    ``directions`` ``[K, d]`` (unit)."""
    return torch.stack([gate_score(h, c, ROUTE_SCORE) for c in directions], dim=1)


def _route_accuracy(parts: Sequence[torch.Tensor], layer: int, directions: torch.Tensor, tau: torch.Tensor) -> float:
    """Mean over categories of the share of its rows whose largest ``score − threshold`` is its own."""
    hits = [
        float(((_projection(a[:, layer], directions) - tau).argmax(1) == k).double().mean())
        for k, a in enumerate(parts)
        if len(a)
    ]
    return _mean(hits)


def fit_router(acts: Activations, categories: Sequence[str], layers: Sequence[int] | None = None) -> Router:
    """The routing gates (one per category source of ``categories``) as a nearest-centroid router.

    Per layer, on the fit parts: each category's mean, ``m_k``; its direction ``(m_k − m̄)/‖·‖`` with ``m̄`` the
    mean of the ``m_k`` (one-vs-rest: what sets it apart from the other categories, not from harmless text); its
    threshold the mean over categories of their mean ``projection`` score, so ``score − threshold`` is centred.
    The layer (of ``layers``, default all) with the best routing accuracy on the select parts wins (ties: the
    shallower). At least two categories."""
    num_layers = acts[categories[0]]["fit"].shape[1]
    fit = [acts[c]["fit"] for c in categories]
    select = [acts[c]["select"] for c in categories]
    grid: list[dict[str, Any]] = []
    best: tuple[float, int, torch.Tensor, torch.Tensor] | None = None
    for layer in layers if layers is not None else range(num_layers):
        directions, tau = _router_at(fit, layer)
        accuracy = _route_accuracy(select, layer, directions, tau)
        grid.append({"layer": layer, "fit": _route_accuracy(fit, layer, directions, tau), "select": accuracy})
        if best is None or _nan_low(accuracy) > best[0]:
            best = (_nan_low(accuracy), layer, directions, tau)
    assert best is not None
    _, layer, directions, tau = best
    return Router(
        layer=layer,
        directions={c: directions[k].clone() for k, c in enumerate(categories)},
        thresholds={c: float(tau[k]) for k, c in enumerate(categories)},
        grid=grid,
    )


def layer_scores(acts: torch.Tensor, directions: torch.Tensor, score: str) -> torch.Tensor:
    """``[n, L]``: :func:`~vllm_steer.core.gates.gate_score` of every row at every layer against that layer's
    direction (``acts`` ``[n, L, d]``, ``directions`` ``[L, d]``)."""
    if acts.shape[0] == 0:
        return torch.zeros(0, acts.shape[1])
    return torch.stack([gate_score(acts[:, layer], directions[layer], score) for layer in range(acts.shape[1])], 1)


def _oriented(scores: torch.Tensor, comparison: str) -> torch.Tensor:
    """Scores turned so that "fires" is always "greater than": ``<`` gates negate."""
    return scores if comparison == ">" else -scores


def balanced_auc(positive: Sequence[torch.Tensor], negative: Sequence[torch.Tensor]) -> float:
    """P(a positive row scores above a negative one), ties half, with every source weighing the same on its side
    (a row's weight is 1 / its source's size). ``positive``/``negative``: one 1-D tensor of scores per source."""
    pos = [p.double() for p in positive if len(p)]
    neg = [q.double() for q in negative if len(q)]
    if not pos or not neg:
        return float("nan")
    total = 0.0
    for p in pos:
        for q in neg:
            diff = p[:, None] - q[None, :]
            total += float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())
    return total / (len(pos) * len(neg))


def _ordered(negative: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``[N, G]``: every gate's oriented scores over all harmless rows, highest first (the candidate thresholds)."""
    return torch.cat(list(negative.values())).sort(dim=0, descending=True).values


def _feasible(negative: Mapping[str, torch.Tensor], tau: torch.Tensor, budgets: Mapping[str, float]) -> bool:
    return all(float((x > tau).any(-1).double().mean()) <= budgets[s] + 1e-12 for s, x in negative.items() if len(x))


def common_thresholds(negative: Mapping[str, torch.Tensor], budgets: Mapping[str, float]) -> tuple[torch.Tensor, int]:
    """The thresholds of OR-ed gates at the most permissive common level that keeps every harmless source's
    false-positive rate (rows where ANY gate fires) at or below its budget.

    ``negative``: harmless source → ``[n_s, G]`` oriented scores (fires: score > threshold). The gates share a
    level ``k``: each gate's threshold is its ``(k+1)``-th highest score over all harmless rows, so at most ``k``
    harmless rows exceed any one gate; the OR's rates only grow with ``k``, so the largest feasible ``k`` is found
    by bisection. ``k = 0`` (every threshold at its gate's maximum) fires on no harmless row and is always feasible.
    For one gate this is the most permissive threshold that meets every budget. Returns ``(thresholds [G], k)``."""
    ordered = _ordered(negative)
    lo, hi = 0, len(ordered) - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _feasible(negative, ordered[mid], budgets):
            lo = mid
        else:
            hi = mid - 1
    return ordered[lo], lo


def or_thresholds(
    negative: Mapping[str, torch.Tensor], positive: Mapping[str, torch.Tensor], budgets: Mapping[str, float]
) -> tuple[torch.Tensor, list[int]]:
    """Thresholds of OR-ed gates: :func:`common_thresholds`, then greedily, while it raises the mean recall over
    ``positive`` (harmful source → ``[n, G]`` oriented scores), the one gate whose threshold can drop furthest
    on its own while the OR still meets every budget drops there. Returns ``(thresholds [G], levels [G])``."""
    ordered = _ordered(negative)
    gates = torch.arange(ordered.shape[1])
    _, k = common_thresholds(negative, budgets)
    levels = [k] * ordered.shape[1]

    def tau_of(levels: Sequence[int]) -> torch.Tensor:
        return ordered[torch.tensor(list(levels)), gates]

    def recall(levels: Sequence[int]) -> float:
        return _mean(list(_rates(positive, tau_of(levels)).values()))

    current = recall(levels)
    while True:
        best: tuple[float, list[int]] | None = None
        for g in range(len(levels)):
            lo, hi = levels[g], len(ordered) - 1
            while lo < hi:
                mid = (lo + hi + 1) // 2
                trial = [*levels[:g], mid, *levels[g + 1 :]]
                if _feasible(negative, tau_of(trial), budgets):
                    lo = mid
                else:
                    hi = mid - 1
            if lo > levels[g]:
                trial = [*levels[:g], lo, *levels[g + 1 :]]
                r = recall(trial)
                if r > current + 1e-12 and (best is None or r > best[0]):
                    best = (r, trial)
        if best is None:
            return tau_of(levels), levels
        current, levels = best


def _rates(by_source: Mapping[str, torch.Tensor], tau: torch.Tensor) -> dict[str, float]:
    """Share of each source's rows on which any gate fires (``[n, G]`` oriented scores against ``tau`` ``[G]``)."""
    return {s: (float((x > tau).any(-1).double().mean()) if len(x) else float("nan")) for s, x in by_source.items()}


def _mean(values: Sequence[float]) -> float:
    kept = [v for v in values if v == v]
    return sum(kept) / len(kept) if kept else float("nan")


# ------------------------------------------------------------------------------------------- grid search


@dataclass(frozen=True)
class GateConfig:
    """One gate of a candidate gating: which direction set, where, how it scores and compares."""

    name: str
    direction: str
    """The direction set (:func:`fit_directions`'s key)."""
    layer: int
    score: str
    comparison: str


@dataclass
class GridRow:
    """One grid point (direction set × layer × score × comparison), a single gate, on the select part."""

    direction: str
    layer: int
    score: str
    comparison: str
    threshold: float
    auc: float
    """Balanced AUC over the target harmful sources against every harmless source."""
    recall: float
    """Mean over the target harmful sources of the share flagged at the threshold."""
    precision: float
    """Flagged harmful rows / all flagged rows (the target harmful and every harmless select row, unweighted)."""
    recall_by_source: dict[str, float]
    fpr_by_source: dict[str, float]

    def key(self) -> tuple[float, float]:
        """What the grid maximizes: recall at the target false-positive rates, then AUC."""
        return (_nan_low(self.recall), _nan_low(self.auc))


def _nan_low(x: float) -> float:
    return -1.0 if x != x else x


@dataclass
class GatingResult:
    """The chosen gating (its spec and unit directions by gate name) and the report (JSON-able)."""

    gating: GatingSpec
    directions: dict[str, torch.Tensor]
    report: dict[str, Any] = field(default_factory=dict)


Scores = Mapping[tuple[str, str], Mapping[str, torch.Tensor]]
"""(direction set, score) → source → ``[n, L]`` scores of one split."""


def _scores_for(acts: Activations, directions: Mapping[str, torch.Tensor], split: str) -> dict:
    return {
        (name, score): {s: layer_scores(parts[split], dirs, score) for s, parts in acts.items()}
        for name, dirs in directions.items()
        for score in GATE_SCORES
    }


def grid_search(
    scores: Mapping[str, torch.Tensor],
    direction: str,
    score: str,
    targets: Sequence[str],
    harmless: Sequence[str],
    budgets: Mapping[str, float],
    layers: Sequence[int] | None = None,
) -> list[GridRow]:
    """Every layer × comparison of one direction set and score, a single gate each, on the select part.

    ``scores``: source → ``[n, L]`` select scores (``targets`` are the harmful sources whose recall counts,
    ``harmless`` those whose false-positive rates must meet ``budgets``; other sources are ignored)."""
    num_layers = next(iter(scores.values())).shape[1]
    rows = []
    for layer in layers if layers is not None else range(num_layers):
        for comparison in COMPARISONS:
            col = {s: _oriented(scores[s][:, layer], comparison)[:, None] for s in [*targets, *harmless]}
            tau, _ = common_thresholds({s: col[s] for s in harmless}, budgets)
            fired = {s: (col[s] > tau).any(-1) for s in col}
            rate = {s: float(fired[s].double().mean()) if len(fired[s]) else float("nan") for s in col}
            tp = sum(int(fired[s].sum()) for s in targets)
            fp = sum(int(fired[s].sum()) for s in harmless)
            rows.append(
                GridRow(
                    direction=direction,
                    layer=layer,
                    score=score,
                    comparison=comparison,
                    threshold=float(tau[0]) if comparison == ">" else -float(tau[0]),
                    auc=balanced_auc([col[s][:, 0] for s in targets], [col[s][:, 0] for s in harmless]),
                    recall=_mean([rate[s] for s in targets]),
                    precision=tp / (tp + fp) if tp + fp else float("nan"),
                    recall_by_source={s: rate[s] for s in targets},
                    fpr_by_source={s: rate[s] for s in harmless},
                )
            )
    return rows


def _best(rows: Sequence[GridRow]) -> GridRow:
    return max(rows, key=lambda r: (*r.key(), -r.layer))  # ties: the shallower layer decides sooner


def _oriented_matrix(configs: Sequence[GateConfig], scores: Scores, source: str) -> torch.Tensor:
    """``[n, G]`` oriented scores of one source's rows under each gate of a gating."""
    return torch.stack(
        [_oriented(scores[(c.direction, c.score)][source][:, c.layer], c.comparison) for c in configs], dim=1
    )


def _evaluate(
    configs: Sequence[GateConfig], scores: Scores, tau: torch.Tensor, harmful: Sequence[str], harmless: Sequence[str]
) -> dict[str, Any]:
    """Flag rates per source of the OR of ``configs`` at oriented thresholds ``tau``, and which gate flags what."""
    sources = [*harmful, *harmless]
    mats = {s: _oriented_matrix(configs, scores, s) for s in sources}
    rates = _rates(mats, tau)
    return {
        "flag_rate": rates,
        "n": {s: len(mats[s]) for s in sources},
        "flagged": {s: int((mats[s] > tau).any(-1).sum()) for s in sources},
        "recall_mean": _mean([rates[s] for s in harmful]),
        "fpr_max": max((rates[s] for s in harmless if rates[s] == rates[s]), default=float("nan")),
        "per_gate": {
            c.name: {
                s: float((mats[s][:, g] > tau[g]).double().mean()) if len(mats[s]) else float("nan") for s in sources
            }
            for g, c in enumerate(configs)
        },
    }


def _curve(
    configs: Sequence[GateConfig],
    select: Scores,
    splits: Mapping[str, Scores],
    harmful: Sequence[str],
    harmless: Sequence[str],
) -> dict[str, Any]:
    """The gating's ROC: its gates' common threshold level swept over the harmless select scores (as
    :func:`common_thresholds` sets it); per split, the mean harmless false-positive rate and each harmful
    source's flag rate at every level, plus the AUC of the mean recall against the mean false-positive rate."""
    ordered = _ordered({s: _oriented_matrix(configs, select, s) for s in harmless})
    levels = sorted({round(i * (len(ordered) - 1) / (_ROC_POINTS - 1)) for i in range(_ROC_POINTS)})
    out: dict[str, Any] = {}
    for split, scores in splits.items():
        mats = {s: _oriented_matrix(configs, scores, s) for s in [*harmful, *harmless]}
        fpr, tpr = [0.0], {s: [0.0] for s in harmful}
        for k in levels:
            rates = _rates(mats, ordered[k])
            fpr.append(_mean([rates[s] for s in harmless]))
            for s in harmful:
                tpr[s].append(rates[s])
        fpr.append(1.0)
        for s in harmful:
            tpr[s].append(1.0)
        mean_tpr = [_mean([tpr[s][i] for s in harmful]) for i in range(len(fpr))]
        auc = sum((fpr[i + 1] - fpr[i]) * (mean_tpr[i + 1] + mean_tpr[i]) / 2 for i in range(len(fpr) - 1))
        out[split] = {"fpr": fpr, "tpr": tpr, "tpr_mean": mean_tpr, "auc": auc}
    return out


def calibrate_gating(
    acts: Activations,
    harmful: Sequence[str],
    harmless: Sequence[str],
    budgets: Mapping[str, float],
    action: str = "refuse",
    layers: Sequence[int] | None = None,
    probe_c: Sequence[float] = (),
    seed: int = 0,
    routes: Mapping[str, str] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> GatingResult:
    """Choose the gating from activations (pure: no model, no files).

    Fits the candidate directions on the fit parts (:func:`fit_directions`), grid-searches each on the select
    parts (:func:`grid_search`), and builds the candidate gatings: ``mean`` (the best pooled difference-of-means
    gate), ``probe`` (the best pooled probe gate, with ``probe_c``), ``per-source`` (the OR of each harmful
    source's best gate) and ``pooled+per-source`` (the OR of the best pooled gate and those). Each OR's
    thresholds are set together (:func:`or_thresholds`) so that the OR meets every harmless source's budget on
    the select part. The candidate with the higher mean recall on the select part wins (ties: its AUC, then
    fewer gates); every candidate's rates on the test parts are reported, and none of them chose anything.

    With ``routes`` (routing source → the category it stands for, at least two; action ``steer``), routing gates
    follow the deciding ones: one per routing source, routing to its category, from :func:`fit_router`. When the
    routing sources are the harmful sources, the deciding gate is the better of the pooled candidates (``mean``,
    ``probe``: one gate over the categories); when they are other sources, the deciding gates are chosen as without
    routing, the OR candidates only if they fit beside the routing gates (:data:`MAX_GATES` in all). The report
    adds ``router`` (its layer and per-layer accuracy) and ``routing`` (per split, which rows of the routing
    sources are gated and where :func:`~vllm_steer.core.gates.route_of` sends them)."""
    if action not in GATE_ACTIONS:
        raise CalibrationError("gate_action", f"unknown {action!r} (one of {', '.join(GATE_ACTIONS)})")
    if not harmful or not harmless:
        raise CalibrationError("gate_harmful" if not harmful else "gate_harmless", "needs at least one source")
    missing = [s for s in harmless if s not in budgets]
    if missing:
        raise CalibrationError("gate_fpr", f"no false-positive target for {missing}")
    routed = list(routes or {})
    shared = bool(routed) and set(routed) == set(harmful)
    if routes is not None:
        if action != "steer":
            raise CalibrationError("gate_action", f"routing gates steer (--gate-route), not {action!r}")
        both = [s for s in harmful if s in routes]
        if both and not shared:
            raise CalibrationError(
                "gate_route",
                f"the harmful sources {list(harmful)} and the routing sources {routed} overlap in {both}: the deciding "
                "gate learns from all the routing sources or from none of them",
            )
        missing = [s for s in routed if s not in acts]
        if missing:
            raise CalibrationError("gate_route", f"no activations for the routing source(s) {missing}")
        if not 2 <= len(routed) < MAX_GATES:
            raise CalibrationError(
                "gate_route",
                f"{len(routed)} categories: routing needs 2 to {MAX_GATES - 1} (a gating holds {MAX_GATES} gates, one "
                "of them deciding)",
            )
    room = MAX_GATES - len(routed)  # the gates left for deciding
    per_source = not shared and len(harmful) > 1 and len(harmful) <= room
    directions = fit_directions(
        acts,
        harmful,
        harmless,
        probe_c,
        seed,
        per_source,
        _ticker(progress, "gate: directions (fit)", _direction_count(harmful, probe_c, per_source)),
    )
    select = _scores_for(acts, directions, "select")
    test = _scores_for(acts, directions, "test")

    grid: dict[str, list[GridRow]] = {}
    tick = _ticker(progress, "gate: grid (select)", len(directions))
    for name in directions:
        target = direction_target(name)
        targets = list(harmful) if target == POOLED_GATE else [target]
        grid[name] = [
            row
            for score in GATE_SCORES
            for row in grid_search(select[(name, score)], name, score, targets, harmless, budgets, layers)
        ]
        tick(1)

    def best_of(target: str, kind: str | None = None) -> GateConfig:
        rows = [
            r
            for name, rs in grid.items()
            if direction_target(name) == target and (kind is None or name.startswith(kind))
            for r in rs
        ]
        row = _best(rows)
        return GateConfig(target, row.direction, row.layer, row.score, row.comparison)

    candidates: dict[str, list[GateConfig]] = {}
    candidates["mean"] = [best_of(POOLED_GATE, "mean:")]
    if probe_c:
        candidates["probe"] = [best_of(POOLED_GATE, "probe-")]
    if per_source:
        each = [best_of(s) for s in harmful]
        candidates[PER_SOURCE] = each
        if len(harmful) < room:
            candidates["pooled+per-source"] = [best_of(POOLED_GATE), *each]

    summaries: dict[str, dict[str, Any]] = {}
    for cname, configs in candidates.items():
        neg = {s: _oriented_matrix(configs, select, s) for s in harmless}
        pos = {s: _oriented_matrix(configs, select, s) for s in harmful}
        tau, levels = or_thresholds(neg, pos, budgets)
        summaries[cname] = {
            "configs": configs,
            "tau": tau,
            "levels": levels,
            "select": _evaluate(configs, select, tau, harmful, harmless),
            "test": _evaluate(configs, test, tau, harmful, harmless),
            "auc": _curve(configs, select, {"select": select}, harmful, harmless)["select"]["auc"],
        }
    chosen = max(
        summaries,
        key=lambda c: (
            _nan_low(summaries[c]["select"]["recall_mean"]),
            _nan_low(summaries[c]["auc"]),
            -len(summaries[c]["configs"]),
        ),
    )
    win = summaries[chosen]
    configs, tau = win["configs"], win["tau"]
    gates = [
        GateSpec(
            name=c.name,
            layer=c.layer,
            tensor=f"gate.{c.name}",
            score=c.score,
            threshold=_threshold(c, tau[g]),
            comparison=c.comparison,
        )
        for g, c in enumerate(configs)
    ]
    gate_vectors = {c.name: directions[c.direction][c.layer].clone() for c in configs}
    router = None
    if routes is not None:
        router = fit_router(acts, routed, layers)
        for source in routed:
            gates.append(
                GateSpec(
                    name=source,
                    layer=router.layer,
                    tensor=f"gate.{source}",
                    score=ROUTE_SCORE,
                    threshold=router.thresholds[source],
                    comparison=">",
                    category=routes[source],
                )
            )
            gate_vectors[source] = router.directions[source]
    gating = GatingSpec(action=action, gates=gates)
    report: dict[str, Any] = {
        "sources": {"harmful": list(harmful), "harmless": list(harmless)}
        | ({"routing": routed} if routes is not None else {}),
        "sizes": {
            s: {split: int(acts[s][split].shape[0]) for split in SPLITS}
            for s in dict.fromkeys([*harmful, *routed, *harmless])
        },
        "target_fpr": dict(budgets),
        "objective": (
            "mean over harmful sources of the share flagged on the select part, at the most permissive thresholds "
            "whose false-positive rate (any gate firing) on every harmless source's select part is at most its "
            "target; ties: AUC, then fewer gates"
            + (
                ""
                if routes is None
                else (" (the deciding gate, the categories its harmful sources)" if shared else " (the deciding gates)")
                + "; routing gates: the layer whose nearest-centroid routing is most accurate on the select part (mean "
                "over categories)"
            )
        ),
        "directions": (
            "per layer, fitted on the fit parts with every source weighing the same: 'mean:*' = unit difference of "
            "means (harmful: mean of harmful sources' means − mean of harmless sources' means; <source>: its mean − "
            "the harmless balanced mean); 'probe-c<C>:*' = unit source-balanced logistic-regression direction "
            "(standardized features, L2, inverse strength C), mapped back to activation space"
        ),
        "probe_c": list(probe_c),
        "grid": [_row_dict(r) for rows in grid.values() for r in rows],
        "candidates": {
            cname: {
                "gates": [
                    {**_config_dict(c), "threshold": _threshold(c, summary["tau"][g])}
                    for g, c in enumerate(summary["configs"])
                ],
                "select": summary["select"],
                "auc_select": summary["auc"],
                "test": summary["test"],
            }
            for cname, summary in summaries.items()
        },
        "chosen": chosen,
        "operating_point": {
            "action": action,
            "gates": [{**g.model_dump(), "direction": c.direction} for g, c in zip(gates, configs, strict=False)]
            + [{**g.model_dump(), "direction": f"route:{g.name}"} for g in gates[len(configs) :]],
            "select": win["select"],
        },
        "test": win["test"],
        "roc": _curve(configs, select, {"select": select, "test": test}, harmful, harmless),
    }
    if routes is not None and router is not None:
        report["routes"] = dict(routes)
        report["router"] = {
            "layer": router.layer,
            "score": ROUTE_SCORE,
            "directions": "per category: its fit mean minus the mean of the category means (unit); threshold: the "
            "categories' balanced mean score on the fit part; a row routes to the largest score − threshold",
            "grid": router.grid,
        }
        report["routing"] = {
            split: _routing(gating, gate_vectors, acts, split, routes, routed, harmless) for split in ("select", "test")
        }
    return GatingResult(gating, gate_vectors, report)


def _routing(
    gating: GatingSpec,
    vectors: Mapping[str, torch.Tensor],
    acts: Activations,
    split: str,
    routes: Mapping[str, str],
    harmful: Sequence[str],
    harmless: Sequence[str],
) -> dict[str, Any]:
    """What the engine's rule does with every row of one split, from the reference formulas: gated when a deciding
    gate fires (:func:`~vllm_steer.core.gates.fired_gates`), then steered with :func:`~vllm_steer.core.gates.route_of`'s
    category. ``confusion``: true category → routed category (:data:`NO_ROUTE`: not gated) → rows; per category its
    ``recall`` (gated), ``accuracy`` (gated and routed to its own category: what it gets), ``route_accuracy``
    (routed to its own, gated or not: the router alone) and ``accuracy_when_fired``; per harmless source the same
    counts (every gated row a false positive)."""
    columns = [*(routes[s] for s in harmful), NO_ROUTE]

    def decisions(source: str) -> list[tuple[bool, str | None]]:
        parts = acts[source][split]
        raw = {g.name: gate_score(parts[:, g.layer], vectors[g.name], g.score).tolist() for g in gating.gates}
        out = []
        for i in range(len(parts)):
            scores = {name: values[i] for name, values in raw.items()}
            out.append((bool(fired_gates(gating, scores)), route_of(gating, scores)))
        return out

    def counts(rows: Sequence[tuple[bool, str | None]]) -> dict[str, int]:
        table = dict.fromkeys(columns, 0)
        for gated, category in rows:
            table[category if gated and category is not None else NO_ROUTE] += 1
        return table

    confusion: dict[str, dict[str, int]] = {}
    per_category: dict[str, dict[str, Any]] = {}
    for s in harmful:
        category = routes[s]
        rows = decisions(s)
        confusion[category] = table = counts(rows)
        n = len(rows)
        gated = n - table[NO_ROUTE]
        per_category[category] = {
            "gate": s,
            "n": n,
            "recall": gated / n if n else float("nan"),
            "accuracy": table[category] / n if n else float("nan"),
            "route_accuracy": sum(c == category for _, c in rows) / n if n else float("nan"),
            "accuracy_when_fired": table[category] / gated if gated else float("nan"),
        }
    harmless_routed = {s: counts(decisions(s)) for s in harmless}
    return {
        "confusion": confusion,
        "per_category": per_category,
        "accuracy_mean": _mean([c["accuracy"] for c in per_category.values()]),
        "route_accuracy_mean": _mean([c["route_accuracy"] for c in per_category.values()]),
        "recall_mean": _mean([c["recall"] for c in per_category.values()]),
        "harmless": harmless_routed,
        "false_positive_rate": {
            s: 1.0 - table[NO_ROUTE] / sum(table.values()) if sum(table.values()) else float("nan")
            for s, table in harmless_routed.items()
        },
    }


def _threshold(c: GateConfig, tau: torch.Tensor) -> float:
    """The threshold a profile stores for an oriented threshold ``tau`` (``<`` gates negate back)."""
    return float(tau) if c.comparison == ">" else -float(tau)


def _config_dict(c: GateConfig) -> dict[str, Any]:
    return {"name": c.name, "direction": c.direction, "layer": c.layer, "score": c.score, "comparison": c.comparison}


def _row_dict(r: GridRow) -> dict[str, Any]:
    return {
        "direction": r.direction,
        "layer": r.layer,
        "score": r.score,
        "comparison": r.comparison,
        "threshold": r.threshold,
        "auc": r.auc,
        "recall": r.recall,
        "precision": r.precision,
        "recall_by_source": r.recall_by_source,
        "fpr_by_source": r.fpr_by_source,
    }


# ------------------------------------------------------------------------------------- the model, the profile


@dataclass
class GateCalibrationConfig:
    """What ``calibrate --gate`` / ``--gate-into`` needs besides the profile."""

    model: str
    harmful: Sequence[str] = DEFAULT_HARMFUL
    harmless: Sequence[str] = DEFAULT_HARMLESS
    fpr: Mapping[str, float] | str | float = 0.01
    """Per harmless source (:func:`parse_fpr`'s output), or its text form."""
    action: str = "refuse"
    n: int | None = None
    """Prompts per source (the first ``n`` in file order); ``None``: all."""
    fractions: Sequence[float] = DEFAULT_FRACTIONS
    seed: int = 0
    data_dir: str | None = None
    prompt_format: str = "auto"
    batch_size: int = 8
    layers: Sequence[int] | None = None
    """Restrict the grid to these layers (default: every layer)."""
    probe_c: Sequence[float] = DEFAULT_PROBE_C
    """Inverse L2 strengths of the probe directions (empty: difference-of-means directions only)."""
    route: Sequence[str] | None = None
    """Routing gates (``--gate-route``): the category profile's categories (:func:`route_categories` drops
    ``generic``); one gate per category the labelled sets label, ``n`` prompts per category. ``None``: none."""
    route_from: Sequence[str] | None = None
    """The labelled sets the router learns from (``--gate-route-from``); ``None``: the harmful sets, which the
    deciding gate then learns from as categories. Given, the deciding gates learn from ``harmful`` less the routing
    prompts (:func:`load_route_sources`)."""
    route_n: int | None = None
    """Routing prompts per category with ``route_from`` (default ``n``)."""


def run_gate_calibration(
    cfg: GateCalibrationConfig, progress: Callable[[str, int, int], None] | None = None
) -> GatingResult:
    """Load the sources and the model, collect the activations, choose the gating (:func:`calibrate_gating`)."""
    if cfg.action not in GATE_ACTIONS:
        raise CalibrationError("gate_action", f"unknown {cfg.action!r} (one of {', '.join(GATE_ACTIONS)})")
    fractions = parse_fractions(cfg.fractions)
    harmful = parse_sources(cfg.harmful, "gate_harmful")
    harmless = parse_sources(cfg.harmless, "gate_harmless")
    overlap = sorted(set(harmful) & set(harmless))
    if overlap:
        raise CalibrationError("gate_harmless", f"{overlap} named as both harmful and harmless")
    routes: dict[str, str] | None = None
    route_from: list[str] | None = None
    if cfg.route is not None:
        if cfg.action != "steer":
            raise CalibrationError("gate_action", f"routing gates steer (--gate-route), not {cfg.action!r}")
        route_from = parse_sources(cfg.route_from, "gate_route_from") if cfg.route_from is not None else None
        sources, routes = load_route_sources(
            harmful, harmless, cfg.route, cfg.data_dir, cfg.n, fractions, cfg.seed, route_from, cfg.route_n
        )
    else:
        if cfg.route_from is not None or cfg.route_n is not None:
            raise CalibrationError("gate_route_from", "routing sources without routing (--gate-route)")
        sources = load_sources(harmful, harmless, cfg.data_dir, cfg.n, fractions, cfg.seed)
    harmful_labels = [s.name for s in sources if s.harmful and s.name not in (routes or {})] or list(routes or {})
    harmless_labels = [s.name for s in sources if not s.harmful]
    budgets = budgets_for(cfg.fpr, harmful, harmless)
    tokenizer = _load_tokenizer(cfg.model)
    try:
        prompt_format = resolve_prompt_format(tokenizer, cfg.prompt_format)
    except ValueError as exc:
        raise CalibrationError("prompt_format", str(exc)) from None
    model = _load_model(cfg.model)
    fp = _fingerprint(model, cfg.model)
    bad = sorted(layer for layer in (cfg.layers or []) if not 0 <= layer < fp.num_layers)
    if bad:
        raise CalibrationError("gate_layers", f"{bad} do not exist in {fp.name} ({fp.num_layers} layers)")
    acts = collect_gate_activations(model, tokenizer, sources, prompt_format, cfg.batch_size, progress)
    result = calibrate_gating(
        acts, harmful_labels, harmless_labels, budgets, cfg.action, cfg.layers, cfg.probe_c, cfg.seed, routes, progress
    )
    result.report.update(
        {
            "model": fp.name,
            "num_layers": fp.num_layers,
            "hook": f"{GATE_HOOK}, last prompt token",
            "prompt_format": prompt_format,
            "origins": {s.name: s.origin for s in sources},
            "split": {
                "fractions": list(fractions),
                "seed": cfg.seed,
                "n_per_source" if routes is None or cfg.route_from is not None else "n_per_category": cfg.n,
            }
            | ({"n_per_category": cfg.route_n or cfg.n} if cfg.route_from is not None else {}),
            "data_dir": cfg.data_dir,
        }
    )
    if routes is not None:
        result.report["harmful_sets"] = list(harmful)
        result.report["route_sets"] = list(route_from) if route_from is not None else list(harmful)
        result.report["unrouted_categories"] = [
            c for c in route_categories(cfg.route or ()) if c not in routes.values()
        ]
    result.report["fingerprint"] = fp.model_dump()
    return result


def add_gating(profile_dir: str | Path, result: GatingResult) -> Path:
    """Add (or replace) the profile's ``gating`` block and its directions, and record how they were chosen in
    ``calibration.gating``; the profile's other files (``report/``) stay. The profile must be for the model the
    gates were calibrated on (same shape)."""
    profile = load_profile(profile_dir)
    spec = profile.spec
    fp = result.report.get("fingerprint")
    if fp is not None:
        problem = spec.model.mismatch(type(spec.model).model_validate(fp))
        if problem:
            raise CalibrationError("gate_into", f"profile {spec.id!r} is for another model: {problem}")
    calibration = dict(spec.calibration)
    calibration["gating"] = gating_record(result.report)
    new_spec = spec.model_copy(update={"gating": result.gating, "calibration": calibration})
    return save_profile(profile_dir, new_spec, profile.vectors, result.directions)


def write_gate_only_profile(
    out: str | Path, result: GatingResult, profile_id: str | None = None, description: str | None = None
) -> Path:
    """Write a gate-only profile (``method: null``: the gates and nothing that steers) to ``out`` (replacing the
    profile there, keeping its other files). ``profile_id`` defaults to ``<model>-gates``. Gates that steer or
    route, or a bad id, are a :class:`CalibrationError` naming the field (the format refuses them)."""
    fp = ModelFingerprint.model_validate(result.report["fingerprint"])
    pid = profile_id or f"{(fp.name or 'model').lower()}-gates"
    try:
        spec = ProfileSpec(
            format_version=1,
            id=pid,
            method=None,
            model=fp,
            layers=[],
            tensors={},
            gating=result.gating,
            calibration={"gating": gating_record(result.report)},
            description=description
            or f"gate-only profile ({result.gating.action}) calibrated by vllm-steer on {fp.name}",
        )
    except ValidationError as exc:
        field, message = field_and_message(exc)
        raise CalibrationError("profile_id" if field == "id" else field, message) from None
    return save_profile(out, spec, {}, result.directions)


def gating_record(report: Mapping[str, Any]) -> dict[str, Any]:
    """What ``calibration.gating`` of a profile records of a gate calibration's ``report``: the sources, split,
    budgets and choice, the test flag rates, and for routing gates the test routing rates and router layer."""
    record: dict[str, Any] = {
        key: report[key]
        for key in (
            "sources",
            "origins",
            "split",
            "sizes",
            "target_fpr",
            "prompt_format",
            "chosen",
            "objective",
            "routes",
            "route_sets",
            "unrouted_categories",
        )
        if key in report
    } | {"test_flag_rate": report["test"]["flag_rate"], "report": "report/gate.md"}
    if "routing" in report:
        test = report["routing"]["test"]
        record["test_routing"] = {
            c: {"recall": r["recall"], "accuracy": r["accuracy"], "route_accuracy": r["route_accuracy"]}
            for c, r in test["per_category"].items()
        }
        record["router_layer"] = report["router"]["layer"]
    return record
