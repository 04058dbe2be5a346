"""Tables and plots for a ``vllm-steer eval`` result (``result.json`` → ``README.md`` + PNGs).

* ``angles.png`` — refusal rate on harmful prompts, over-refusal on harmless prompts and perplexity
  (under the unsteered model, with the §5.3 violation threshold) against the angle, one line per
  rotation profile, on one figure;
* ``scales.png`` — the same against the scale for additive profiles;
* ``categories.png`` — per category, the category's own vector vs the generic vector;
* ``compare.png`` — every setting side by side (refusal, over-refusal, capability accuracy);
* ``gates.png`` — gated profiles next to their ungated copies: refusal on harmful prompts against over-refusal
  on the harmless and the over-refusal sets, and the gate's precision and recall.

Gated profiles also get a table of their own (:func:`gate_table`; docs/methods.md §3.11).
"""

from __future__ import annotations

import json
from pathlib import Path

from vllm_steer.core.methods import ANGLE_METHODS
from vllm_steer.evaluation.plotting import pyplot, save

__all__ = ["write_eval_report", "markdown_table", "gate_table"]


def _fmt(x, digits=2) -> str:
    return "–" if x is None or x != x else f"{x:.{digits}f}"


def _label(p: dict) -> str:
    if p["profile"] is None:
        return "unsteered"
    kind = "θ" if p["method"] in ANGLE_METHODS else "×"
    return f"{p['profile']} {kind}{p['value']:g}" if p["value"] is not None else p["profile"]


def _over_set(result: dict) -> str | None:
    return (result.get("data") or {}).get("over_refusal")


def markdown_table(result: dict) -> str:
    judges = result.get("judges", [])
    extra = [j for j in judges if j != "substring"]
    over = _over_set(result)
    head = [
        "setting",
        "refusal (harmful)",
        "ASR",
        "over-refusal (harmless)",
        *([f"over-refusal ({over})"] if over else []),
        "ppl (unsteered model)",
        "ppl (self)",
        "unicode contam.",
        "compression",
        "4-gram rep.",
        "MC accuracy",
    ] + [f"{j}: refusal (harmful)" for j in extra]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in result["points"]:
        cells = [
            _label(p),
            _fmt(p["refusal_harmful"]),
            _fmt(p["attack_success"]),
            _fmt(p["refusal_harmless"]),
            *([_fmt(p.get("refusal_over_refusal_set"))] if over else []),
            _fmt(p["perplexity_unsteered"]),
            _fmt(p["perplexity_steered"]),
            _fmt(p["unicode_contamination"], 3),
            _fmt(p["compression_ratio"]),
            _fmt(p["ngram_repetition"]),
            _fmt(p.get("capability_accuracy")),
        ]
        for j in extra:
            s = (p.get("judges") or {}).get(j, {}).get("harmful") or {}
            cells.append(
                f"{_fmt(s.get('refusal_rate'))} ({s.get('unparseable', 0)} unparseable, {s.get('failed', 0)} failed)"
            )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


GATE_COLUMNS = (
    "setting",
    "action",
    "gate precision",
    "gate recall",
    "undecided",
    "flag rate (harmful)",
    "flag rate (harmless)",
    "flag rate ({over})",
    "refusal (harmful)",
    "over-refusal (harmless)",
    "over-refusal ({over})",
    "answered rows",
    "answered: ppl (unsteered model)",
    "answered: ppl (self)",
    "answered: unicode contam.",
    "answered: compression",
    "answered: 4-gram rep.",
)


def gate_table(result: dict) -> str:
    """Gated settings next to their ungated copies (and the unsteered baseline): the gate's precision and recall
    against the prompt labels, its flag rate per set, refusal and over-refusal counting the gate's refusals, and
    the coherence of the rows the gate did not refuse. Empty without gated settings."""
    gated = [p for p in result["points"] if p.get("gate")]
    if not gated:
        return ""
    over = _over_set(result) or "over-refusal set"
    head = [c.format(over=over) for c in GATE_COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = next((p for p in result["points"] if p["profile"] is None), None)
    if base is not None:
        cells = ["unsteered", "–", "–", "–", "–", "–", "–", "–"]
        cells += [_fmt(base["refusal_harmful"]), _fmt(base["refusal_harmless"])]
        cells += [_fmt(base.get("refusal_over_refusal_set")), str(base["n_harmful"] + base["n_harmless"])]
        cells += [_fmt(base["perplexity_unsteered"]), _fmt(base["perplexity_steered"])]
        cells += [_fmt(base["unicode_contamination"], 3), _fmt(base["compression_ratio"])]
        cells += [_fmt(base["ngram_repetition"])]
        lines.append("| " + " | ".join(cells) + " |")
    for p in gated:
        g = p["gate"]
        flags = g.get("flag_rate") or {}
        answered = g.get("answered") or {}
        label = _label(p) + (" (no gate)" if g.get("ungated_of") else " (gate-only)" if p["method"] is None else "")
        cells = [
            label,
            g.get("action") or "none",
            _fmt(g.get("precision")),
            _fmt(g.get("recall")),
            str(g["undecided"]) if g.get("gated") else "–",
            _fmt(flags.get("harmful")),
            _fmt(flags.get("harmless")),
            _fmt(flags.get("over_refusal")),
            _fmt(g.get("refusal_harmful")),
            _fmt(g.get("over_refusal_harmless")),
            _fmt(g.get("over_refusal_set")),
            str(answered.get("n", "–")),
            _fmt(answered.get("perplexity_unsteered")),
            _fmt(answered.get("perplexity_steered")),
            _fmt(answered.get("unicode_contamination"), 3),
            _fmt(answered.get("compression_ratio")),
            _fmt(answered.get("ngram_repetition")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _gate_plot(result: dict, path: Path) -> bool:
    points = [p for p in result["points"] if p.get("gate")]
    if not points:
        return False
    plt = pyplot()
    over = _over_set(result) or "over-refusal set"
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(10, 1.6 * len(points) + 4), 4), width_ratios=(2, 1))
    xs = range(len(points))
    bars = (
        ("refusal_harmful", "refusal (harmful)"),
        ("over_refusal_harmless", "over-refusal (harmless)"),
        ("over_refusal_set", f"over-refusal ({over})"),
    )
    width = 0.8 / len(bars)
    for k, (key, name) in enumerate(bars):
        offset = (k - (len(bars) - 1) / 2) * width
        heights = [p["gate"].get(key) or 0.0 for p in points]
        hatches = ["//" if p["gate"].get("ungated_of") else "" for p in points]
        drawn = ax1.bar([x + offset for x in xs], heights, width=width, label=name)
        for patch, hatch in zip(drawn, hatches, strict=True):
            patch.set_hatch(hatch)
    ax1.set_xticks(list(xs), [_label(p) for p in points], rotation=30, ha="right", fontsize=8)
    ax1.set(ylim=(0, 1.05), ylabel="rate", title="gated vs ungated (hatched): refusal and over-refusal")
    ax1.legend(fontsize=7)
    gated = [p for p in points if p["gate"].get("gated")]
    gx = range(len(gated))
    ax2.bar([x - 0.2 for x in gx], [p["gate"].get("precision") or 0.0 for p in gated], width=0.4, label="precision")
    ax2.bar([x + 0.2 for x in gx], [p["gate"].get("recall") or 0.0 for p in gated], width=0.4, label="recall")
    ax2.set_xticks(list(gx), [_label(p) for p in gated], rotation=30, ha="right", fontsize=8)
    ax2.set(ylim=(0, 1.05), title="gate vs labels (harmful = positive)")
    ax2.legend(fontsize=7)
    save(fig, path)
    return True


def _line_plot(result: dict, methods: set[str], xlabel: str, path: Path) -> bool:
    points = [p for p in result["points"] if p["method"] in methods and p["value"] is not None]
    if len(points) < 2:
        return False
    plt = pyplot()
    base = next((p for p in result["points"] if p["profile"] is None), None)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    for pid in sorted({p["profile"] for p in points}):
        ps = sorted((p for p in points if p["profile"] == pid), key=lambda p: p["value"])
        xs = [p["value"] for p in ps]
        (line,) = ax1.plot(xs, [p["refusal_harmful"] for p in ps], marker="o", label=f"{pid}: harmful")
        ax1.plot(xs, [p["refusal_harmless"] for p in ps], ls="--", color=line.get_color(), label=f"{pid}: harmless")
        ax2.plot(xs, [p["perplexity_unsteered"] for p in ps], marker="s", color=line.get_color(), label=pid)
    if base:
        ax1.axhline(base["refusal_harmful"], color="grey", lw=0.8, ls=":", label="unsteered")
        ax2.axhline(base["perplexity_unsteered"], color="grey", lw=0.8, ls=":", label="unsteered")
    ax2.axhline(result["perplexity_violation_threshold"], color="red", lw=0.8, ls="--", label="violation threshold")
    ax1.set(
        xlabel=xlabel,
        ylabel="refusal rate (substring)",
        ylim=(-0.05, 1.05),
        title="refusal: harmful (solid), harmless (dashed)",
    )
    ax2.set(xlabel=xlabel, ylabel="perplexity under the unsteered model", yscale="log", title="coherence")
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=7)
    save(fig, path)
    return True


def _category_plot(result: dict, path: Path) -> bool:
    cats = result.get("categories") or []
    if not cats:
        return False
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(cats)), 3.8))
    xs = range(len(cats))
    ax.bar([x - 0.2 for x in xs], [c["refusal_own"] for c in cats], width=0.4, label="own category vector")
    if any("refusal_generic" in c for c in cats):
        ax.bar([x + 0.2 for x in xs], [c.get("refusal_generic", 0) for c in cats], width=0.4, label="generic vector")
    ax.set_xticks(list(xs), [c["category"] for c in cats], rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("refusal rate on the category's prompts")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    save(fig, path)
    return True


def _compare_plot(result: dict, path: Path) -> bool:
    points = result["points"]
    if len(points) < 2:
        return False
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(points)), 3.8))
    xs = range(len(points))
    ax.bar([x - 0.27 for x in xs], [p["refusal_harmful"] for p in points], width=0.27, label="refusal (harmful)")
    ax.bar(list(xs), [p["refusal_harmless"] for p in points], width=0.27, label="over-refusal (harmless)")
    ax.bar([x + 0.27 for x in xs], [p.get("capability_accuracy") or 0 for p in points], width=0.27, label="MC accuracy")
    ax.set_xticks(list(xs), [_label(p) for p in points], rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    save(fig, path)
    return True


def write_eval_report(out: str | Path, result: dict | None = None) -> Path:
    """Write ``README.md`` and the plots next to ``result.json``; returns the README path."""
    out = Path(out)
    result = result if result is not None else json.loads((out / "result.json").read_text())
    lines = [
        f"# vllm-steer eval: {result['model']}",
        "",
        f"- served by: {result['backend']}; all rows in one mixed batch: {result['served_in_one_mixed_batch']}",
        f"- rows: {result['rows']}, generation {result['generate_seconds']} s",
        f"- data: {result['data']}",
        f"- perplexity violation threshold (docs/methods.md §5.3): {result['perplexity_violation_threshold']}",
        "",
        markdown_table(result),
        "",
    ]
    for note in result.get("notes") or []:
        lines += [f"> note: {note}", ""]
    for name, made in (
        (
            "angles.png",
            _line_plot(
                result, {"selective", "angular_standard", "angular_adaptive"}, "angle (degrees)", out / "angles.png"
            ),
        ),
        ("scales.png", _line_plot(result, {"addition", "probe", "category"}, "scale", out / "scales.png")),
        ("compare.png", _compare_plot(result, out / "compare.png")),
    ):
        if made:
            lines.append(f"![{name}]({name})")
    table = gate_table(result)
    if table:
        lines += [
            "",
            "## Gates (docs/methods.md §3.11): gated settings next to the same profile without its gate",
            "",
            (
                "Precision and recall of the gate against the prompt labels (harmful = positive, the harmless sets ="
                " negative; undecided rows left out); flag rate = share of decided rows whose gate fired; refusal and"
                " over-refusal count the gate's own refusals; `answered` = the harmful and harmless rows the gate did"
                " not refuse."
            ),
            "",
            table,
        ]
        if _gate_plot(result, out / "gates.png"):
            lines += ["", "![gates.png](gates.png)"]
    if result.get("categories"):
        lines += [
            "",
            "## Per category: own vector vs generic",
            "",
            "| profile | category | n | refusal (own) | refusal (generic) | ppl (own) | ppl (generic) | own beats generic |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for c in result["categories"]:
            if "refusal_generic" not in c:
                beats = "–"
            else:
                beats = {1: "yes", 0: "tie", -1: "no"}[
                    (c["refusal_own"] > c["refusal_generic"]) - (c["refusal_own"] < c["refusal_generic"])
                ]
            lines.append(
                f"| {c['profile']} | {c['category']} | {c['n']} | {_fmt(c['refusal_own'])} | "
                f"{_fmt(c.get('refusal_generic'))} | {_fmt(c['perplexity_own'])} | {_fmt(c.get('perplexity_generic'))} | {beats} |"
            )
        if _category_plot(result, out / "categories.png"):
            lines += ["", "![categories.png](categories.png)"]
    if result.get("capability"):
        lines += ["", "## Capability retention (multiple choice)", "", "| setting | accuracy | n |", "|---|---|---|"]
        lines += [f"| {k} | {_fmt(v['accuracy'])} | {v['n']} |" for k, v in result["capability"].items()]
    path = out / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return path
