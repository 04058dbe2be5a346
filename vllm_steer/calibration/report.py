"""The calibration report a person reads: PNG plots and a Markdown summary in ``<profile>/report/``.

* ``sweep.png`` — refusal rate (harmful, harmless) and perplexity against the swept angle/scale,
  with the perplexity-violation threshold (docs/methods.md §5.3) and the chosen default.
* ``layer_projections.png`` — per hook site, the mean per-sample cosine of each class with
  ``b1``; the discriminative layers (opposite signs) are shaded.
* ``direction_cosines.png`` — cosine similarity between the per-site candidate directions.
* ``probe_accuracy.png`` — held-out probe accuracy per layer (probe profiles).
* ``gate.json``, ``gate.md``, ``gate_roc.png`` — gate calibration (``calibrate --gate``,
  :mod:`vllm_steer.calibration.gates`): the grid, the operating point and the test-split flag rates; for
  routing gates (``--gate-route``) also the routing accuracy and confusion table per category.
"""

from __future__ import annotations

import json
from pathlib import Path

from vllm_steer.core.profile import load_profile
from vllm_steer.evaluation.metrics import PERPLEXITY_VIOLATION
from vllm_steer.evaluation.plotting import pyplot, save

__all__ = ["write_report", "write_gate_report"]


def write_report(profile_dir: str | Path, diagnostics: dict | None = None) -> Path:
    """Draw the plots and the summary; ``diagnostics`` come from calibration (saved beside the plots)."""
    profile_dir = Path(profile_dir)
    out = profile_dir / "report"
    out.mkdir(exist_ok=True)
    profile = load_profile(profile_dir)
    spec = profile.spec
    saved = out / "diagnostics.json"
    if diagnostics:  # kept so the report can be redrawn later without recalibrating
        saved.write_text(json.dumps(diagnostics))
    elif saved.exists():
        diagnostics = json.loads(saved.read_text())
    diagnostics = diagnostics or {}
    plt = pyplot()
    lines = [
        f"# Calibration report: `{spec.id}`",
        "",
        f"- method: `{spec.method}`",
        f"- model: {spec.model.name or spec.model.architecture} (d={spec.model.hidden_size}, {spec.model.num_layers} layers)",
        f"- steered layers: {spec.layers}",
        f"- defaults: {spec.defaults.model_dump(exclude_none=True)}",
        f"- data: {spec.calibration.get('datasets')} sizes {spec.calibration.get('sizes')} split {spec.calibration.get('split')}",
    ]
    for key in ("b1_site", "contrast", "sign", "angle_convention", "default_from"):
        if key in spec.calibration:
            lines.append(f"- {key.replace('_', ' ')}: {spec.calibration[key]}")

    if "sites" in diagnostics:
        sites = diagnostics["sites"]
        x = range(len(sites))
        fig, ax = plt.subplots(figsize=(10, 3.5))
        ax.plot(x, diagnostics["projection_harmful"], label="harmful: mean cos(â, b1)", color="tab:red")
        ax.plot(x, diagnostics["projection_harmless"], label="harmless: mean cos(â, b1)", color="tab:blue")
        ax.axhline(0, color="grey", lw=0.8)
        disc = set(diagnostics["discriminative_layers"])
        for i, site in enumerate(sites):
            if int(site.split(".")[0]) in disc:
                ax.axvspan(i - 0.5, i + 0.5, color="tab:green", alpha=0.15, lw=0)
        step = max(1, len(sites) // 15)
        ax.set_xticks(list(range(0, len(sites), step)), [sites[i].split(".")[0] for i in range(0, len(sites), step)])
        ax.set_xlabel("layer (each has an input-norm and a post-attention-norm site); discriminative layers shaded")
        ax.set_ylabel("projection on b1")
        ax.legend(loc="best", fontsize=8)
        save(fig, out / "layer_projections.png")
        fig, ax = plt.subplots(figsize=(5.5, 4.5))
        im = ax.imshow(diagnostics["candidate_cosines"], vmin=-1, vmax=1, cmap="coolwarm")
        ax.set_title(f"cosine between site directions (b1 = site {diagnostics['b1_index']})", fontsize=9)
        fig.colorbar(im, ax=ax)
        save(fig, out / "direction_cosines.png")
        lines += [
            "",
            (
                f"Discriminative layers (opposite-signed class projections on every norm of the block): "
                f"{diagnostics['discriminative_layers']}"
            ),
            "",
            "![projections](layer_projections.png) ![cosines](direction_cosines.png)",
        ]

    if "probe_accuracy" in diagnostics:
        acc = {int(layer): a for layer, a in diagnostics["probe_accuracy"].items()}  # JSON keys are strings
        fig, ax = plt.subplots(figsize=(8, 3))
        ax.bar(
            list(acc), list(acc.values()), color=["tab:green" if layer in spec.layers else "tab:grey" for layer in acc]
        )
        ax.set_xlabel("layer (steered layers green)")
        ax.set_ylabel("held-out accuracy")
        ax.set_ylim(0, 1.05)
        save(fig, out / "probe_accuracy.png")
        lines += ["", "| layer | held-out probe accuracy |", "|---|---|"]
        lines += [f"| {layer} | {a:.3f} |" for layer, a in acc.items()]
        lines += ["", "![probe accuracy](probe_accuracy.png)"]

    sweep = spec.calibration.get("sweep")
    if sweep:
        points = [p for p in sweep["points"] if p["value"] is not None]
        base = next(p for p in sweep["points"] if p["value"] is None)
        xs = [p["value"] for p in points]
        fig, ax = plt.subplots(figsize=(8, 3.8))
        ax.plot(xs, [p["refusal_harmful"] for p in points], "o-", color="tab:red", label="refusal, harmful")
        ax.plot(xs, [p["refusal_harmless"] for p in points], "o-", color="tab:blue", label="refusal, harmless")
        ax.set_xlabel(sweep["parameter"])
        ax.set_ylabel("refusal rate (substring)")
        ax.set_ylim(-0.05, 1.05)
        ax2 = ax.twinx()
        ax2.plot(xs, [p["perplexity"] for p in points], "s--", color="black", label="perplexity")
        ax2.axhline(PERPLEXITY_VIOLATION, color="grey", ls=":", label=f"violation ({PERPLEXITY_VIOLATION})")
        ax2.axhline(base["perplexity"], color="tab:green", ls=":", label="unsteered perplexity")
        ax2.set_ylabel("perplexity")
        if sweep["chosen"] is not None:
            ax.axvline(sweep["chosen"], color="tab:purple", lw=1.5, label="chosen default")
        handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
        ax.legend(handles=handles, fontsize=7, loc="upper left")
        ax.set_title(
            f"{spec.id}: sweep ({sweep['prompts']['harmful']}+{sweep['prompts']['harmless']} held-out prompts, one mixed batch)",
            fontsize=9,
        )
        save(fig, out / "sweep.png")
        lines += [
            "",
            f"## Sweep ({sweep['parameter']})",
            "",
            f"Criterion: {sweep['criterion']}. Chosen: {sweep['chosen']}.",
            "",
            "| value | refusal harmful | refusal harmless | perplexity | compression | unicode |",
            "|---|---|---|---|---|---|",
        ]
        for p in sweep["points"]:
            v = "unsteered" if p["value"] is None else f"{p['value']:g}"
            lines.append(
                f"| {v} | {p['refusal_harmful']:.2f} | {p['refusal_harmless']:.2f} | {p['perplexity']:.2f} | "
                f"{p['compression_ratio']:.2f} | {p['unicode_score']:.3f} |"
            )
        lines += ["", "![sweep](sweep.png)"]
    if spec.gating is not None:
        deciding = ", ".join(
            f"`{g.name}` (layer {g.layer}, {g.score} {g.comparison} {g.threshold:.4g})" for g in spec.gating.deciding
        )
        lines += ["", "## Gates", "", f"Action `{spec.gating.action}` when any of {deciding} fires."]
        if spec.gating.routes:
            routing = ", ".join(
                f"`{g.name}` (layer {g.layer}, {g.score} − {g.threshold:.4g}; routes to {g.category})"
                for g in spec.gating.gates
                if g.category is not None
            )
            lines.append(
                f'With `steer_categories: "auto"` a gated row steers with the category of the routing gate with the '
                f"largest margin: {routing}."
            )
        if (out / "gate.md").exists():
            lines.append("Calibration, operating point and test-split rates: [gate.md](gate.md).")
    (out / "README.md").write_text("\n".join(lines) + "\n")
    return out


def _pct(x: float | None) -> str:
    return "—" if x is None or x != x else f"{x:.3f}"


def _routing_lines(report: dict) -> list[str]:
    """gate.md's routing section: per category, on the test part, the recall, the routing accuracy and where
    the rows went; per harmless source, the false-positive rate and where those rows went."""
    test = report["routing"]["test"]
    select = report["routing"]["select"]
    confusion = test["confusion"]
    columns = list(next(iter(confusion.values())))
    lines = [
        "",
        "## Routing (test part): which prompts are gated, and where `route_of` sends them",
        "",
        (
            f"Router: layer {report['router']['layer']}, {report['router']['directions']}. A gated row steers with "
            '`route_of`\'s category (`steer_categories: "auto"`). Gated: the deciding gate fires; routed to it: '
            "`route_of` picks the prompt's own category (gated or not: the router alone); **gated and routed to it**: "
            "what the prompt gets (shares of all its test prompts)."
        ),
        "",
        "| category | test n | gated | routed to it | **gated and routed to it** | routed to it when gated | select: routed to it |",
        "|---|---|---|---|---|---|---|",
    ]
    for category, r in test["per_category"].items():
        lines.append(
            f"| {category} | {r['n']} | {_pct(r['recall'])} | {_pct(r['route_accuracy'])} | **{_pct(r['accuracy'])}** | "
            f"{_pct(r['accuracy_when_fired'])} | {_pct(select['per_category'][category]['route_accuracy'])} |"
        )
    lines.append(
        f"| mean | | {_pct(test['recall_mean'])} | {_pct(test['route_accuracy_mean'])} | **{_pct(test['accuracy_mean'])}** | | "
        f"{_pct(select['route_accuracy_mean'])} |"
    )
    per_layer = ", ".join(f"{r['layer']}: {_pct(r['select'])}" for r in report["router"]["grid"])
    lines += ["", f"Routing accuracy per layer (select part, mean over categories): {per_layer}."]
    lines += [
        "",
        "### False positives per harmless source (test part: gated)",
        "",
        "| source | target (select) | test false-positive rate | test n |",
        "|---|---|---|---|",
    ]
    for source, rate in test["false_positive_rate"].items():
        n = sum(test["harmless"][source].values())
        lines.append(f"| {source} | {_pct(report['target_fpr'][source])} | **{_pct(rate)}** | {n} |")
    short = {c: report["routing"]["test"]["per_category"][c]["gate"] for c in columns if c in test["per_category"]}
    lines += [
        "",
        "### Confusion (test part): true category (rows) → routed category of the gated prompts (columns; none: not gated)",
        "",
        "| true → routed | " + " | ".join(short.get(c, c) for c in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for category, counts in [*confusion.items(), *test["harmless"].items()]:
        cells = [f"**{counts[c]}**" if c == category else str(counts[c] or "·") for c in columns]
        lines.append(f"| {category} | " + " | ".join(cells) + " |")
    if report.get("unrouted_categories"):
        lines += ["", f"Categories of the profile without labelled prompts (no gate): {report['unrouted_categories']}"]
    return lines


def write_gate_report(profile_dir: str | Path, report: dict, plot: bool = True) -> Path:
    """``report/gate.json`` (everything), ``report/gate.md`` (what a person reads) and, with ``plot``,
    ``report/gate_roc.png`` (the chosen gating's ROC per harmful source, and AUC per layer and score)."""
    out = Path(profile_dir) / "report"
    out.mkdir(exist_ok=True)
    (out / "gate.json").write_text(json.dumps(report, indent=1) + "\n")
    harmful, harmless = report["sources"]["harmful"], report["sources"]["harmless"]
    routing = report["sources"].get("routing", [])
    sources = [*harmful, *harmless]
    op, test = report["operating_point"], report["test"]
    split = report.get("split", {})
    lines = [
        "# Gate calibration",
        "",
        f"- model: {report.get('model', '?')}, hook `{report.get('hook', '?')}`, format `{report.get('prompt_format', '?')}`",
        (
            f"- split per source (seed {split.get('seed', '?')}, shares {split.get('fractions', '?')}): fit (directions), "
            "select (grid, thresholds), test (this report's rates; chose nothing)"
        ),
        f"- false-positive target per harmless source (select part): {report['target_fpr']}",
        f"- objective: {report['objective']}",
        f"- directions: {report['directions']}",
        "",
        "| source | class | fit | select | test |",
        "|---|---|---|---|---|",
    ]
    for s in dict.fromkeys([*harmful, *routing, *harmless]):
        size = report["sizes"][s]
        kind = "harmful" if s in harmful else f"routes to {report['routes'][s]}" if s in routing else "harmless"
        lines.append(f"| {s} | {kind} | {size['fit']} | {size['select']} | {size['test']} |")
    lines += [
        "",
        f"## Operating point: `{report['chosen']}`, action `{op['action']}`",
        "",
        "| gate | direction | layer | score | comparison | threshold |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {g['name']} | {g['direction']} | {g['layer']} | {g['score']} | {g['comparison']} | {g['threshold']:.6g} |"
        for g in op["gates"]
    ]
    lines += [
        "",
        "## Flag rate per source (any gate fires)",
        "",
        "| source | select | test | test flagged / n |",
        "|---|---|---|---|",
    ]
    for s in sources:
        lines.append(
            f"| {s} | {_pct(op['select']['flag_rate'][s])} | **{_pct(test['flag_rate'][s])}** | "
            f"{test['flagged'][s]} / {test['n'][s]} |"
        )
    lines += [
        "",
        "## Candidates (chosen by the select part; test rates shown, never used to choose)",
        "",
        "| candidate | gates | select mean recall | select AUC | " + " | ".join(f"test {s}" for s in sources) + " |",
        "|---|---|---|---|" + "---|" * len(sources),
    ]
    for name, c in report["candidates"].items():
        gates = ", ".join(f"{g['direction']}@{g['layer']} {g['score']}{g['comparison']}" for g in c["gates"])
        rates = " | ".join(_pct(c["test"]["flag_rate"][s]) for s in sources)
        lines.append(f"| {name} | {gates} | {_pct(c['select']['recall_mean'])} | {_pct(c['auc_select'])} | {rates} |")
    if "routing" in report:
        lines += _routing_lines(report)
    pooled = [r for r in report["grid"] if r["direction"].split(":", 1)[1] == "harmful"]
    kinds = sorted({r["direction"] for r in pooled})
    lines += [
        "",
        "## Grid (pooled directions, select part): best comparison per layer and score",
        "",
        "| direction | layer | score | comparison | AUC | recall@FPR | precision | threshold |",
        "|---|---|---|---|---|---|---|---|",
    ]
    best: dict[tuple[str, int, str], dict] = {}
    for r in pooled:
        key = (r["direction"], r["layer"], r["score"])
        if key not in best or (r["recall"], r["auc"]) > (best[key]["recall"], best[key]["auc"]):
            best[key] = r
    for (direction, layer, score), r in sorted(best.items()):
        lines.append(
            f"| {direction} | {layer} | {score} | {r['comparison']} | {_pct(r['auc'])} | {_pct(r['recall'])} | "
            f"{_pct(r['precision'])} | {r['threshold']:.4g} |"
        )
    if plot:
        plt = pyplot()
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
        roc = report["roc"]
        for i, s in enumerate(harmful):
            color = f"C{i}"
            ax.plot(roc["test"]["fpr"], roc["test"]["tpr"][s], color=color, label=f"{s} (test)")
            ax.plot(roc["select"]["fpr"], roc["select"]["tpr"][s], color=color, ls=":", lw=0.8)
        chosen_fpr = sum(test["flag_rate"][s] for s in harmless) / len(harmless)
        ax.scatter([chosen_fpr] * len(harmful), [test["flag_rate"][s] for s in harmful], color="black", zorder=3)
        ax.set_xscale("symlog", linthresh=0.01)
        ax.set_xlim(0, 1)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("mean false-positive rate over harmless sources (symlog)")
        ax.set_ylabel("flag rate")
        ax.set_title(f"{report['chosen']}: ROC per harmful source (dotted: select); dots: operating point", fontsize=8)
        ax.legend(fontsize=7 if len(harmful) <= 6 else 5, loc="lower right")
        for j, direction in enumerate(kinds):
            for score, ls in (("cast", "-"), ("projection", "--")):
                rows = sorted(
                    (r for (d, _, sc), r in best.items() if d == direction and sc == score), key=lambda r: r["layer"]
                )
                if rows:
                    ax2.plot(
                        [r["layer"] for r in rows],
                        [r["auc"] for r in rows],
                        ls=ls,
                        color=f"C{j}",
                        label=f"{direction} {score}",
                    )
        if "router" in report:
            grid = report["router"]["grid"]
            ax2.plot([r["layer"] for r in grid], [r["select"] for r in grid], color="black", lw=1.5,
                     label="routing accuracy (select)")  # fmt: skip
        ax2.set_xlabel("layer")
        ax2.set_ylabel("balanced AUC (select)" + ("; routing accuracy" if "router" in report else ""))
        ax2.legend(fontsize=6 if len(kinds) <= 6 else 4, loc="lower right")
        save(fig, out / "gate_roc.png")
        lines += ["", "![ROC](gate_roc.png)"]
    (out / "gate.md").write_text("\n".join(lines) + "\n")
    return out
