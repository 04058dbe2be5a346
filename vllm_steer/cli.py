"""``vllm-steer`` command line: the demo, profile inspection, the default model."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperCommand

app = typer.Typer(help="Per-request activation steering inside vLLM.", no_args_is_help=True, add_completion=False)
profiles_app = typer.Typer(help="Inspect and validate steering profiles.", no_args_is_help=True)
app.add_typer(profiles_app, name="profiles")
console = Console()


@app.command()
def demo(
    model: str | None = typer.Option(None, help="HF model directory (default: the embedded SmolLM2-135M-Instruct)."),
    profiles: str | None = typer.Option(None, help="Profile directory (default: the repo's profiles/)."),
    max_tokens: int = typer.Option(48, min=1, help="New tokens per row."),
    eager: bool = typer.Option(True, "--eager/--compile", help="Eager mode, or torch.compile (slower start)."),
) -> None:
    """Serve a mixed batch: every prompt unsteered and with each demo profile, in one engine call."""
    from vllm_steer.demo import run_demo

    rows, facts = run_demo(model=model, profiles=profiles, max_tokens=max_tokens, eager=eager)
    table = Table(title="vllm-steer demo — one mixed batch, each row its own steering", show_lines=True)
    table.add_column("prompt", max_width=28)
    table.add_column("steering", style="cyan")
    table.add_column("refusal?", justify="center")
    table.add_column("output", max_width=70)
    for row in rows:
        mark = "[red]yes[/red]" if row.refusal else "no"
        table.add_row(
            escape(f"[{row.kind}] {row.prompt}"), escape(row.setting), mark, escape(row.text.replace("\n", " "))
        )
    console.print(table)
    status = facts["status"]
    console.print(
        f"model {facts['model']}\nprofiles {', '.join(status['profiles'])} ({status['sites']} hook sites, {status['max_slots']} slots)\n"
        f"engine start {facts['startup_s']:.0f} s; {facts['rows']} rows, {facts['output_tokens']} tokens in one generate call "
        f"({facts['generate_s']:.1f} s)"
    )


@app.command()
def calibrate(
    model: str = typer.Argument(..., help="HF model directory (the weights the engine serves)."),
    method: str | None = typer.Option(
        None,
        help="selective | angular_standard | angular_adaptive | ablation | addition | category | probe "
        "(required unless --gate-into or --gate-only).",
    ),
    out: Path | None = typer.Option(None, help="Profile directory to write (required unless --gate-into)."),
    harmful: str = typer.Option(
        "advbench",
        help="advbench | catqa | harmbench | xstest-unsafe | xstest (with --harmless labels) | a CSV/JSONL file.",
    ),
    harmless: str = typer.Option(
        "alpaca",
        help="alpaca | xstest-safe | a CSV/JSONL file | 'labels' (both classes from the --harmful set's label column).",
    ),
    profile_id: str | None = typer.Option(
        None, "--id", help="Profile id (default: <model>-<method>; with --gate-only, <model>-gates)."
    ),
    data_dir: str | None = typer.Option(
        None,
        help="Read the named prompt sets from this directory (default: $VLLM_STEER_DATA, else the packaged copies).",
    ),
    n: int = typer.Option(128, min=1, help="Prompts per class (per category for the category method)."),
    held_out: float = typer.Option(0.2, min=0.0, max=0.9, help="Share of prompts held out (probe accuracy, sweeps)."),
    seed: int = typer.Option(0, help="Split seed."),
    layers: str | None = typer.Option(None, help="Comma-separated layers (default: chosen per method)."),
    categories: str | None = typer.Option(None, help="Comma-separated categories to keep (category method)."),
    angle: float | None = typer.Option(None, help="Default angle to record (rotation methods)."),
    scale: float | None = typer.Option(None, help="Default scale to record (additive methods)."),
    contrast: str = typer.Option(
        "reply",
        help="addition: 'reply' (refusal vs compliant reply, teacher-forced) or "
        "'system-prompt' (with vs without a safety system prompt).",
    ),
    prompt_format: str = typer.Option(
        "auto",
        help="How prompts are formatted, here and in the sweep: 'chat' (the model's chat template), 'plain' "
        "(the raw text, for base models) or 'auto' (chat when the tokenizer has a template, else plain).",
    ),
    batch_size: int = typer.Option(8, min=1),
    sweep: str = typer.Option(
        "auto",
        help="Grid through the engine: 'start:stop:step' or 'a,b,c'; 'auto' "
        "(angles 0:360:10, scales 0.25,0.5,1,2,4) or 'none'.",
    ),
    sweep_n: int = typer.Option(8, min=1, help="Held-out prompts per class in the sweep."),
    max_tokens: int = typer.Option(32, min=1, help="New tokens per sweep row."),
    report: bool = typer.Option(
        True, "--report/--no-report", help="Write plots and a Markdown summary to <out>/report/."
    ),
    gate: bool = typer.Option(
        False, "--gate/--no-gate", help="Also calibrate a gating block (docs/methods.md §2.9) into the profile."
    ),
    gate_into: Path | None = typer.Option(
        None,
        help="Calibrate only the gates, into this existing profile directory (adds or replaces its gating block; "
        "keeps its report/). Implies --gate; no --method or --out.",
    ),
    gate_only: bool = typer.Option(
        False,
        "--gate-only",
        help="Write a gate-only profile to --out: the gates and nothing that steers (method null; action refuse or "
        "flag). Implies --gate; no --method, sweep or --gate-route.",
    ),
    gate_action: str | None = typer.Option(
        None, help="What a firing gate does: refuse | steer | flag (default: refuse; steer with --gate-route)."
    ),
    gate_route: bool = typer.Option(
        False,
        "--gate-route",
        help="Category profiles: one routing gate per category the labelled --gate-harmful (or --gate-route-from) "
        "data covers (--gate-n prompts per category); a gated request with steer_categories 'auto' steers with the "
        "category of the routing gate with the largest margin. Action steer.",
    ),
    gate_route_from: str | None = typer.Option(
        None,
        help="With --gate-route: the labelled sets the router learns from (comma-separated); the deciding gates "
        "then learn from --gate-harmful less those prompts. Default: the --gate-harmful sets, as categories.",
    ),
    gate_route_n: int | None = typer.Option(
        None, min=3, help="With --gate-route-from: routing prompts per category (default: --gate-n)."
    ),
    gate_fpr: str = typer.Option(
        "0.01",
        help="Largest false-positive rate per harmless source on the select split: a rate for every source, "
        "or with exceptions, e.g. '0.01,xstest-safe=0.2'.",
    ),
    gate_harmful: str = typer.Option(
        "advbench,harmbench,catqa,xstest-unsafe", help="Harmful gate sources: comma-separated named sets or files."
    ),
    gate_harmless: str = typer.Option(
        "alpaca,xstest-safe", help="Harmless gate sources: comma-separated named sets or files."
    ),
    gate_n: int | None = typer.Option(
        None, min=3, help="Prompts per gate source (the first N in file order; default: all)."
    ),
    gate_split: str = typer.Option(
        "0.4,0.3,0.3", help="Shares of every gate source for fit (directions), select (grid) and test (report)."
    ),
    gate_layers: str | None = typer.Option(None, help="Comma-separated layers the gate grid may use (default: all)."),
    gate_probe_c: str = typer.Option(
        "0.01,0.1,1",
        help="Inverse L2 strengths of the logistic-regression gate directions, comma-separated; 'none' for "
        "difference-of-means directions only.",
    ),
) -> None:
    """Collect activations, compute the method's directions, write a validated profile, sweep its default.

    With --gate (or --gate-into DIR), also choose gates on held-out splits and write them as the profile's
    gating block, with report/gate.md; with --gate-route, routing gates, one per category of a category profile."""
    if gate_only:
        for name, given in (("--method", method is not None), ("--gate-into", gate_into is not None)):
            if given:
                raise typer.BadParameter(
                    "not with --gate-only (a gate-only profile steers nothing)", param_hint=f"'{name}'"
                )
        if out is None:
            raise typer.BadParameter("required: the gate-only profile's directory", param_hint="'--out'")
        if gate_route:
            raise typer.BadParameter("routing gates steer; a gate-only profile does not", param_hint="'--gate-route'")
        if gate_action == "steer":
            raise typer.BadParameter("a gate-only profile's gates refuse or flag", param_hint="'--gate-action'")
        import re

        from vllm_steer.core.profile import PROFILE_ID_PATTERN

        if profile_id is not None and not re.fullmatch(PROFILE_ID_PATTERN, profile_id):
            raise typer.BadParameter(
                f"{profile_id!r}: lower-case letters, digits, '.', '_', '-' (up to 128)", param_hint="'--id'"
            )
    elif gate_into is not None:
        for name, value in (("--method", method), ("--out", out)):
            if value is not None:
                raise typer.BadParameter(f"not with --gate-into (which updates {gate_into})", param_hint=f"'{name}'")
    else:
        for name, value in (("--method", method), ("--out", out)):
            if value is None:
                raise typer.BadParameter("required (unless --gate-into)", param_hint=f"'{name}'")
    if gate_route and not gate and gate_into is None:
        raise typer.BadParameter("routing gates are calibrated with --gate or --gate-into", param_hint="'--gate-route'")
    for name, given in (
        ("--gate-route-from", gate_route_from is not None),
        ("--gate-route-n", gate_route_n is not None),
    ):
        if given and not gate_route:
            raise typer.BadParameter("needs --gate-route", param_hint=f"'{name}'")
    if gate_route_n is not None and gate_route_from is None:
        raise typer.BadParameter(
            "counts the prompts of --gate-route-from (without it, --gate-n counts per category)",
            param_hint="'--gate-route-n'",
        )
    if gate_route and gate_into is None and method != "category":
        raise typer.BadParameter(
            f"routes to the categories of a category profile (--method category, not {method})",
            param_hint="'--gate-route'",
        )
    gate_cfg = _gate_config(
        gate or gate_into is not None or gate_only,
        model=model,
        gate_action=gate_action or ("steer" if gate_route else "refuse"),
        gate_route=gate_route,
        gate_route_from=gate_route_from,
        gate_route_n=gate_route_n,
        gate_fpr=gate_fpr,
        gate_harmful=gate_harmful,
        gate_harmless=gate_harmless,
        gate_n=gate_n,
        gate_split=gate_split,
        gate_layers=gate_layers,
        gate_probe_c=gate_probe_c,
        seed=seed,
        data_dir=data_dir,
        prompt_format=prompt_format,
        batch_size=batch_size,
    )
    if gate_cfg is not None:
        _require_extra("sklearn", "calibrate", "gate calibration")
    if gate_only:
        if report:
            _require_extra("matplotlib", "calibrate", "--report")
        assert gate_cfg is not None and out is not None
        _calibrate_gates(out, gate_cfg, report, gate_only=True, profile_id=profile_id)
        return
    if gate_into is not None:
        if report:
            _require_extra("matplotlib", "calibrate", "--report")
        assert gate_cfg is not None
        gate_cfg = _route_config(gate_cfg, gate_into, None)
        _calibrate_gates(gate_into, gate_cfg, report)
        return
    assert method is not None and out is not None  # checked above
    if method == "probe":
        _require_extra("sklearn", "calibrate", "--method probe")
    if report:
        _require_extra("matplotlib", "calibrate", "--report")

    from vllm_steer.calibration.pipeline import CalibrationConfig, CalibrationError, calibrate_profile
    from vllm_steer.core.profile import ProfileError, load_profile
    from vllm_steer.data import DatasetError

    cfg = CalibrationConfig(
        model=model,
        method=method,
        out=out,
        harmful=harmful,
        harmless=harmless,
        profile_id=profile_id,
        data_dir=data_dir,
        n=n,
        held_out=held_out,
        seed=seed,
        batch_size=batch_size,
        layers=[int(x) for x in layers.split(",")] if layers else None,
        categories=[c.strip() for c in categories.split(",")] if categories else None,
        angle=angle,
        scale=scale,
        contrast=contrast,
        prompt_format=prompt_format,
    )
    if gate_cfg is not None:
        gate_cfg = _route_config(gate_cfg, None, cfg)
    with _phase_progress() as progress:
        diagnostics: dict = {}
        try:
            path = calibrate_profile(cfg, progress, diagnostics)
        except (CalibrationError, DatasetError, ProfileError) as exc:
            console.print(f"[red]calibration failed:[/red] {escape(str(exc))}")
            raise typer.Exit(1) from None
    profile = load_profile(path)
    console.print(f"wrote {path}: {profile.spec.method} on layers {_layers(profile.spec.layers)}")
    from vllm_steer.core.methods import parameter_of

    if sweep != "none" and parameter_of(profile.method) is not None:
        _sweep(cfg, path, profile, model, sweep, sweep_n, max_tokens)
    if gate_cfg is not None:
        if gate_cfg.route is not None:  # the categories the profile now has (checked against the data above)
            gate_cfg = dataclasses.replace(gate_cfg, route=tuple(profile.spec.categories))
        _calibrate_gates(path, gate_cfg, report)
    if report:
        from vllm_steer.calibration.report import write_report

        console.print(f"report: {write_report(path, diagnostics)}")


@contextlib.contextmanager
def _phase_progress() -> Iterator[Callable[[str, int, int], None]]:
    """Progress bars, one per phase: ``progress(phase, done, total)`` (calibration's and the gates')."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    ) as bar:
        tasks: dict[str, TaskID] = {}

        def progress(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(phase, total=total)
            bar.update(tasks[phase], completed=done)

        yield progress


def _gate_config(enabled: bool, **o: Any):
    """The gate calibration's settings from ``calibrate``'s options (``None`` without --gate); a bad value is a
    usage error naming its option, before anything runs."""
    if not enabled:
        return None
    from vllm_steer.calibration.gates import (
        GateCalibrationConfig,
        budgets_for,
        parse_fractions,
        parse_sources,
    )
    from vllm_steer.calibration.pipeline import CalibrationError
    from vllm_steer.core.gates import GATE_ACTIONS

    def numbers(option: str, text: str | None, kind: type) -> list | None:
        if text is None:
            return None
        try:
            return [kind(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise typer.BadParameter(f"{text!r} is not a comma-separated list of numbers", param_hint=option) from None

    if o["gate_action"] not in GATE_ACTIONS:
        raise typer.BadParameter(
            f"{o['gate_action']!r} is not one of {', '.join(GATE_ACTIONS)}", param_hint="'--gate-action'"
        )
    if o["gate_route"] and o["gate_action"] != "steer":
        raise typer.BadParameter(
            f"routing gates steer (--gate-route), not {o['gate_action']!r}", param_hint="'--gate-action'"
        )
    probe_c = (
        [] if o["gate_probe_c"].strip().lower() == "none" else numbers("'--gate-probe-c'", o["gate_probe_c"], float)
    )
    if probe_c is not None and any(not c > 0 for c in probe_c):
        raise typer.BadParameter("inverse strengths are positive", param_hint="'--gate-probe-c'")
    try:
        harmful = parse_sources(o["gate_harmful"], "gate_harmful")
        harmless = parse_sources(o["gate_harmless"], "gate_harmless")
        cfg = GateCalibrationConfig(
            model=o["model"],
            harmful=harmful,
            harmless=harmless,
            fpr=budgets_for(o["gate_fpr"], harmful, harmless),
            action=o["gate_action"],
            n=o["gate_n"],
            fractions=parse_fractions(o["gate_split"]),
            seed=o["seed"],
            data_dir=o["data_dir"],
            prompt_format=o["prompt_format"],
            batch_size=o["batch_size"],
            layers=numbers("'--gate-layers'", o["gate_layers"], int),
            probe_c=tuple(probe_c or ()),
            route=() if o["gate_route"] else None,  # the profile's categories: _route_config
            route_from=(
                parse_sources(o["gate_route_from"], "gate_route_from") if o["gate_route_from"] is not None else None
            ),
            route_n=o["gate_route_n"],
        )
    except CalibrationError as exc:
        raise typer.BadParameter(exc.message, param_hint=f"'--{exc.field.replace('_', '-')}'") from None
    return cfg


def _route_config(cfg: Any, gate_into: Path | None, calibration: Any) -> Any:
    """With --gate-route: ``cfg`` routing to the profile's categories — those of the profile at ``gate_into``, or
    those the category method will find in ``calibration``'s data — after checking, before any model runs, that
    the profile is a category profile and that the labelled --gate-harmful data covers one of its categories
    (else a usage error naming --gate-route). Without it, ``cfg`` unchanged."""
    if cfg.route is None:
        return cfg
    from vllm_steer.calibration.gates import load_route_sources, route_categories
    from vllm_steer.calibration.pipeline import CalibrationError, split_data
    from vllm_steer.core.profile import ProfileError, load_profile

    if gate_into is not None:
        try:
            spec = load_profile(gate_into).spec
        except ProfileError:
            return cfg  # _calibrate_gates reports the broken profile
        if spec.method != "category":
            raise typer.BadParameter(
                f"routes to the categories of a category profile; {spec.id!r} has method {spec.method!r}",
                param_hint="'--gate-route'",
            )
        categories = list(spec.categories)
    else:
        try:
            harmful_train, *_ = split_data(calibration)
        except CalibrationError:
            return cfg  # the calibration itself reports it
        categories = sorted({p.category for p in harmful_train if p.category is not None})
    try:
        load_route_sources(
            cfg.harmful,
            cfg.harmless,
            route_categories(categories),
            cfg.data_dir,
            cfg.n,
            cfg.fractions,
            cfg.seed,
            cfg.route_from,
            cfg.route_n,
        )
    except CalibrationError as exc:
        raise typer.BadParameter(exc.message, param_hint=f"'--{exc.field.replace('_', '-')}'") from None
    return dataclasses.replace(cfg, route=tuple(categories))


def _calibrate_gates(
    profile_dir: Path, cfg: Any, report: bool, *, gate_only: bool = False, profile_id: str | None = None
) -> None:
    """Choose the gates, write them into the profile at ``profile_dir`` and ``report/gate.*``; print the result.

    ``gate_only``: write a gate-only profile there instead, with id ``profile_id`` (default: ``<model>-gates``)."""

    from vllm_steer.calibration.gates import add_gating, run_gate_calibration, write_gate_only_profile
    from vllm_steer.calibration.pipeline import CalibrationError
    from vllm_steer.calibration.report import write_gate_report
    from vllm_steer.core.profile import ProfileError, load_profile

    if not gate_only:
        try:
            spec = load_profile(profile_dir).spec  # before the model runs: the profile must exist and load
        except ProfileError as exc:
            console.print(f"[red]gate calibration failed:[/red] {escape(str(exc))}")
            raise typer.Exit(1) from None
        if spec.gate_only and cfg.action == "steer":
            raise typer.BadParameter(
                f"{spec.id!r} is gate-only: its gates refuse or flag", param_hint="'--gate-action'"
            )
    with _phase_progress() as progress:
        try:
            result = run_gate_calibration(cfg, progress)
            if gate_only:
                write_gate_only_profile(profile_dir, result, profile_id)
            else:
                add_gating(profile_dir, result)
        except (CalibrationError, ProfileError) as exc:
            console.print(f"[red]gate calibration failed:[/red] {escape(str(exc))}")
            raise typer.Exit(1) from None
    where = write_gate_report(profile_dir, result.report, plot=report)
    rep = result.report
    written = load_profile(profile_dir)
    kind = " (gate-only profile)" if written.spec.gate_only else ""
    table = Table(title=f"gates of {written.id}{kind}: {rep['chosen']}, action {result.gating.action}")
    routing = rep.get("routing")
    for col in ("gate", "direction", "layer", "score", "threshold", *(("routes to",) if routing else ())):
        table.add_column(col)
    for g in rep["operating_point"]["gates"]:
        table.add_row(
            g["name"],
            g["direction"],
            str(g["layer"]),
            g["score"],
            f"{g['comparison']} {g['threshold']:.5g}",
            *((escape(g.get("category") or "— (decides)"),) if routing else ()),
        )
    console.print(table)
    if routing:
        routed = Table(
            title=f"routing per category (test split; router at layer {rep['router']['layer']}: the routing gate "
            "with the largest margin)"
        )
        for col in ("category", "test n", "gated", "routed to it", "gated and routed to it"):
            routed.add_column(col, justify="right")
        test = routing["test"]
        for category, r in test["per_category"].items():
            cells = (f"{r[k]:.3f}" for k in ("recall", "route_accuracy", "accuracy"))
            routed.add_row(escape(category), str(r["n"]), *cells)
        means = (f"{test[k]:.3f}" for k in ("recall_mean", "route_accuracy_mean", "accuracy_mean"))
        routed.add_row("mean", "", *means)
        console.print(routed)
    rates = Table(title="flag rate per source (select chose; test reports)")
    for col in ("source", "select", "test", "test n"):
        rates.add_column(col, justify="right")
    for s, rate in rep["test"]["flag_rate"].items():
        rates.add_row(
            s, f"{rep['operating_point']['select']['flag_rate'][s]:.3f}", f"{rate:.3f}", str(rep["test"]["n"][s])
        )
    console.print(rates)
    console.print(f"gate report: {where / 'gate.md'}")


def _require_extra(module: str, extra: str, what: str) -> None:
    """Stop before a long run, not at its end, when an optional dependency is missing."""
    from vllm_steer.core.extras import MissingExtraError, require

    try:
        require(module, extra, what)
    except MissingExtraError as exc:
        console.print(f"[red]{escape(str(exc))}[/red]")
        raise typer.Exit(1) from None


def _sweep(cfg, path: Path, profile, model: str, sweep: str, sweep_n: int, max_tokens: int) -> None:
    from vllm_steer.calibration.pipeline import split_data
    from vllm_steer.calibration.sweep import default_grid, sweep_profile_dir
    from vllm_steer.core.methods import METHODS

    grid = default_grid(profile.method, sweep)  # the method's grid for 'auto'; mirrored where it steers with -scale
    _, harmful_held, _, harmless_held = split_data(cfg)
    if not harmful_held or not harmless_held:
        console.print("[yellow]no held-out prompts (--held-out 0): sweep skipped[/yellow]")
        return
    harmful_texts = [p.text for p in harmful_held[:sweep_n]]
    harmless_texts = [p.text for p in harmless_held[:sweep_n]]
    console.print(
        f"sweeping {len(grid)} values x {len(harmful_texts) + len(harmless_texts)} held-out prompts in one engine call"
    )
    points, chosen, criterion = sweep_profile_dir(path, model, grid, harmful_texts, harmless_texts, max_tokens)
    table = Table(title=f"sweep of {profile.id}")
    for col in ("value", "refusal harmful", "refusal harmless", "perplexity", "compression", "unicode"):
        table.add_column(col, justify="right")
    for p in points:
        mark = " *" if chosen is not None and p.value == chosen.value else ""
        table.add_row(
            "unsteered" if p.value is None else f"{p.value:g}{mark}",
            f"{p.refusal_harmful:.2f}",
            f"{p.refusal_harmless:.2f}",
            f"{p.perplexity:.2f}",
            f"{p.compression_ratio:.2f}",
            f"{p.unicode_score:.3f}",
        )
    console.print(table)
    parameter = METHODS[profile.method].parameter
    assert parameter is not None  # calibrate sweeps only the methods that have one
    kept = getattr(profile.spec.defaults, parameter)
    verdict = f"kept {kept:g}" if chosen is None else f"{chosen.value:g}"
    console.print(f"default: {verdict} ({escape(criterion)})")


class _SteerOptionsCommand(TyperCommand):
    """``serve``'s ``--steer-*`` options are :class:`~vllm_steer.core.settings.SteerConfig`'s fields: their help
    is the field's documentation and its environment variable, read when the command runs (core imports torch)."""

    def get_params(self, ctx: Any) -> list[Any]:  # typer's own click Context and Parameters
        from vllm_steer.core.settings import SteerConfig

        params = super().get_params(ctx)
        for param in params:
            if param.name and param.name.startswith("steer_"):
                option = SteerConfig.option(param.name.removeprefix("steer_"))
                param.help = f"{option.help} (sets {option.env})"  # type: ignore[attr-defined]  # an Option
        return params


@app.command(
    "serve", cls=_SteerOptionsCommand, context_settings={"allow_extra_args": True, "ignore_unknown_options": True}
)
def serve(
    ctx: typer.Context,
    plugin: list[str] = typer.Option([], "--plugin", help="vLLM plugins to load (vllm_steer is always loaded)."),
    # One option per SteerConfig field, named steer_<field> (tests/unit/test_settings.py checks both ways).
    steer_profiles: str | None = typer.Option(None),
    steer_max_slots: int | None = typer.Option(None),
    steer_tenants: str | None = typer.Option(None),
    steer_audit_log: str | None = typer.Option(None),
    steer_audit_prompts: bool | None = typer.Option(None, "--steer-audit-prompts/--no-steer-audit-prompts"),
    steer_strict_model_match: bool | None = typer.Option(
        None, "--steer-strict-model-match/--no-steer-strict-model-match"
    ),
    steer_hook_all_sites: bool | None = typer.Option(None, "--steer-hook-all-sites/--no-steer-hook-all-sites"),
    steer_fused_op: str | None = typer.Option(None, metavar="[auto|off|triton|compiled]"),
    steer_max_body_bytes: int | None = typer.Option(None),
    steer_allow_admin_options: bool | None = typer.Option(
        None, "--steer-allow-admin-options/--no-steer-allow-admin-options"
    ),
    steer_public_metrics: bool | None = typer.Option(None, "--steer-public-metrics/--no-steer-public-metrics"),
    dry_run: bool = typer.Option(False, help="Print the vLLM command and environment instead of starting it."),
) -> None:
    """`vllm serve [MODEL]` with vllm-steer: sets the plugin's options, hands every other argument to vLLM unchanged.

    MODEL (first argument, or --model) defaults to the embedded SmolLM2-135M-Instruct. vLLM parses its command
    line before it loads plugins, so the `--plugin`/`--steer-*` options live here and reach vLLM's processes as
    environment variables (VLLM_PLUGINS, VLLM_STEER_*; a `--steer-*` option wins over its variable).

    On CPU, unless VLLM_CPU_KVCACHE_SPACE, --kv-cache-memory-bytes or --gpu-memory-utilization is given, the KV
    cache is a quarter of the memory available now, within [1, 8] GiB (vLLM's own default reserves a fraction of
    all memory and refuses to start unless it is free); the choice is printed.
    """
    import os

    from vllm_steer.core.settings import ConfigError, SteerConfig
    from vllm_steer.server.launch import prepare

    given = {option.field: ctx.params.get(option.param) for option in SteerConfig.options()}
    try:
        launch = prepare(given, plugin, list(ctx.args), os.environ)
    except ConfigError as err:
        console.print(f"[red]{SteerConfig.option(err.field).flag}:[/red] {escape(err.message)}")
        raise typer.Exit(2) from None
    for note in launch.notes:  # on stderr: --dry-run's stdout is one line of JSON
        Console(stderr=True).print(f"[bold]vllm-steer serve[/bold] {escape(note)}")
    if dry_run:
        typer.echo(json.dumps({"env": launch.shown, "cmd": launch.cmd}))
        return
    console.print(f"[bold]vllm-steer serve[/bold] {escape(' '.join(f'{k}={v}' for k, v in launch.shown.items()))}")
    os.execvpe(launch.cmd[0], launch.cmd, launch.env)


@app.command("serve-ray")
def serve_ray(
    config: Path = typer.Argument(
        Path("deploy/serve.yaml"), help="Serve config whose applications use vllm_steer.server.ray_app:build_app."
    ),
    num_cpus: int | None = typer.Option(
        None,
        min=1,
        help="Logical CPUs of the local Ray cluster (each CPU replica "
        "reserves 2: over-subscribe small machines, e.g. 8 on 2 cores).",
    ),
    num_gpus: int | None = typer.Option(None, min=0, help="GPUs of the local Ray cluster (default: detected)."),
    address: str | None = typer.Option(None, help="Join this running Ray cluster instead of starting one."),
    host: str | None = typer.Option(None, help="Override http_options.host."),
    port: int | None = typer.Option(None, help="Override http_options.port."),
) -> None:
    """Ray Serve: steered vLLM replicas behind the tenant-policy ingress, until Ctrl-C (see deploy/README.md)."""
    from pydantic import ValidationError

    from vllm_steer.core.errors import SteerError
    from vllm_steer.server.ray_app import run_local

    if not config.is_file():
        console.print(f"[red]config:[/red] {escape(str(config))} does not exist")
        raise typer.Exit(2)
    try:
        run_local(
            config,
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            address=address,
            host=host,
            port=port,
            log=lambda line: console.print(f"[bold]serve-ray[/bold] {escape(line)}"),
        )
    except (SteerError, ValidationError) as err:  # bad args, profiles or tenants file (named); Ray's schema
        console.print(f"[red]{escape(str(err))}[/red]")
        raise typer.Exit(2) from None


@app.command("eval", context_settings={"allow_extra_args": True})
def eval_cmd(
    ctx: typer.Context,
    profile: list[str] = typer.Option([], "--profile", help="Profile to sweep (repeatable); see --angles/--scales."),
    compare: list[str] = typer.Option(
        [], "--compare", help="Profiles to compare at their defaults: --compare P1 P2 ..."
    ),
    angles: str = typer.Option("0:360:30", help="Angle grid for rotation profiles ('start:stop:step' or 'a,b,c')."),
    scales: str = typer.Option("-4,-2,-1,0.25,0.5,1,2,4", help="Scale grid for additive profiles."),
    model: str | None = typer.Option(None, help="HF model directory (default: the embedded SmolLM2-135M-Instruct)."),
    profiles: Path = typer.Option(Path("profiles"), help="Profile directory the engine loads."),
    data: str = typer.Option(
        "advbench", help="Harmful prompts: advbench | harmbench | catqa | xstest-unsafe | a CSV/JSONL file."
    ),
    harmless: str = typer.Option(
        "alpaca",
        help="Harmless prompts (over-refusal): alpaca | xstest-safe (the standard over-refusal set, "
        "250 rows: lower --offset) | a CSV/JSONL file.",
    ),
    over_refusal: str = typer.Option(
        "xstest-safe",
        help="A second harmless set for over-refusal, in the same batch: xstest-safe | alpaca | a CSV/JSONL file | "
        "none.",
    ),
    over_refusal_offset: int = typer.Option(0, min=0, help="Skip this many rows of the over-refusal set."),
    ungated_comparison: bool = typer.Option(
        True,
        "--ungated-comparison/--no-ungated-comparison",
        help="Gated profiles: also evaluate each without its gate ('<id>-ungated', a temporary copy; offline only).",
    ),
    n: int = typer.Option(100, min=1, help="Prompts per set."),
    offset: int = typer.Option(
        200, min=0, help="Skip this many rows of each set (the demo profiles were calibrated on the first 64)."
    ),
    data_dir: str | None = typer.Option(
        None,
        help="Read the named prompt sets from this directory (default: $VLLM_STEER_DATA, else the packaged copies).",
    ),
    max_tokens: int = typer.Option(64, min=1),
    judge: list[str] = typer.Option(
        ["substring"], help="substring | llm:<base_url>#<model> | classifier:<base_url>#<model> (repeatable)."
    ),
    judge_api_key_env: str | None = typer.Option(None, help="Environment variable holding the judge's API key."),
    capability: bool = typer.Option(
        True, "--capability/--no-capability", help="Multiple-choice accuracy with and without steering."
    ),
    capability_n: int | None = typer.Option(None, min=1, help="At most this many multiple-choice items."),
    category_data: str = typer.Option("catqa", help="Prompts with a category column, for category profiles."),
    category_n: int = typer.Option(8, min=1, help="Prompts per category (category profiles)."),
    category_offset: int = typer.Option(
        30, min=0, help="Skip this many prompts per category (calibration used the first 24)."
    ),
    server: str | None = typer.Option(None, help="Evaluate through a running vllm-steer server at this URL instead."),
    api_key_env: str | None = typer.Option(None, help="Environment variable holding the server API key."),
    out: Path = typer.Option(Path("eval-results"), help="Output directory (result.json, README.md, PNGs)."),
) -> None:
    """Measure refusal/ASR, over-refusal, coherence and capability per setting (and gates, for gated profiles): every
    setting is a row of one mixed batch."""
    _require_extra("matplotlib", "eval", "vllm-steer eval (the report's plots)")
    from vllm_steer.calibration.sweep import parse_grid
    from vllm_steer.core.methods import parameter_of
    from vllm_steer.core.profile import ProfileError, load_profile_dir
    from vllm_steer.evaluation.report import write_eval_report
    from vllm_steer.evaluation.runner import EvalConfig, EvalError, EvalTarget, run_eval

    compare = [*compare, *[a for a in ctx.args if not a.startswith("-")]]
    stray = [a for a in ctx.args if a.startswith("-")]
    if stray:
        console.print(f"[red]unknown option {escape(stray[0])}[/red]")
        raise typer.Exit(2)
    if not profile and not compare:
        console.print("[red]--profile or --compare:[/red] name at least one profile")
        raise typer.Exit(2)
    try:
        loaded = load_profile_dir(profiles)
        targets = []
        for pid in profile:
            if pid not in loaded:
                raise EvalError("profile", f"unknown {pid!r} (in {profiles}: {sorted(loaded)})")
            method = loaded[pid].method
            grid_text = {"angle": angles, "scale": scales}.get(parameter_of(method) or "")
            grid = parse_grid(grid_text) if grid_text is not None else None
            targets.append(EvalTarget(pid, tuple(grid) if grid is not None else None))
        targets += [EvalTarget(pid) for pid in compare]
        if model is None:
            from vllm_steer.default_model import ensure_default_model

            model = str(ensure_default_model())
        cfg = EvalConfig(
            model=model,
            profiles=str(profiles),
            targets=targets,
            out=out,
            harmful=data,
            harmless=harmless,
            n=n,
            offset=offset,
            data_dir=data_dir,
            max_tokens=max_tokens,
            judges=list(judge),
            judge_api_key_env=judge_api_key_env,
            capability=capability,
            capability_n=capability_n,
            category_data=category_data,
            category_n=category_n,
            category_offset=category_offset,
            server=server,
            api_key_env=api_key_env,
            over_refusal=None if over_refusal.lower() == "none" else over_refusal,
            over_refusal_offset=over_refusal_offset,
            ungated_comparison=ungated_comparison,
        )
        result = run_eval(cfg, progress=lambda msg: console.print(f"[cyan]{escape(msg)}[/cyan]"))
    except (EvalError, ProfileError, ValueError) as exc:
        console.print(f"[red]eval failed:[/red] {escape(str(exc))}")
        raise typer.Exit(1) from None
    readme = write_eval_report(out, result)
    from vllm_steer.evaluation.report import markdown_table

    console.print(markdown_table(result))
    from vllm_steer.evaluation.report import gate_table

    gates = gate_table(result)
    if gates:
        console.print(gates)
    for note in result.get("notes") or []:
        console.print(f"[yellow]note: {escape(note)}[/yellow]")
    for name in result["judges"]:
        summaries = [s for p in result["points"] for s in p["judges"][name].values()]
        failed = sum(s["failed"] for s in summaries)
        unparseable = sum(s["unparseable"] for s in summaries)
        if failed or unparseable:
            console.print(
                f"[yellow]judge {escape(name)}: {failed} verdicts failed (unreachable or HTTP errors), "
                f"{unparseable} unparseable; they are counted in result.json, not guessed[/yellow]"
            )
    console.print(f"wrote {out / 'result.json'} and {readme}")


def _ints(text: str | None) -> list[int] | None:
    return [int(x) for x in text.split(",") if x.strip()] if text else None


@app.command("import")
def import_cmd(
    model: str = typer.Argument(..., help="HF model directory the vectors are for (its config is checked)."),
    source: Path = typer.Argument(
        ..., help=".gguf control vector, .safetensors, .npz or .npy (an SAE with --sae-features)."
    ),
    out: Path = typer.Option(..., help="Profile directory to write."),
    profile_id: str = typer.Option(..., "--id", help="Profile id."),
    method: str = typer.Option("addition", help="addition (length = gain) | probe (unit, ±scale) | ablation (unit)."),
    layers: str | None = typer.Option(None, help="Layers for a single vector, or a subset of the file's layers."),
    layer_offset: int = typer.Option(
        0, help="Added to the file's layer indices (-1 for files counting hidden_states from the embeddings)."
    ),
    key: str | None = typer.Option(None, help="The one tensor/array in the file to use."),
    sae_features: str | None = typer.Option(None, help="Comma-separated SAE feature indices (rows of the decoder)."),
    sae_layer: int | None = typer.Option(None, help="The layer whose output the SAE was trained on."),
    sae_key: str = typer.Option("W_dec", help="Decoder matrix name in the SAE file."),
    scale: float = typer.Option(1.0, help="Default scale to record (addition/probe)."),
    scale_range: str = typer.Option("-4:4", help="Allowed scale range 'min:max'."),
    ignore_model_hint: bool = typer.Option(
        False, help="Accept a GGUF whose controlvector.model_hint names another architecture."
    ),
) -> None:
    """Turn vectors made elsewhere (llama.cpp/repeng GGUF, safetensors/NumPy, SAE rows) into a validated profile."""
    from vllm_steer.calibration.interop import (
        VectorImportError,
        import_vectors,
        model_fingerprint,
        read_gguf_control_vector,
        read_sae_features,
        read_vector_file,
    )
    from vllm_steer.core.profile import ProfileError, load_profile

    try:
        lo, hi = (float(x) for x in scale_range.split(":"))
    except ValueError:
        console.print(f"[red]--scale-range:[/red] expected 'min:max', got {escape(scale_range)!r}")
        raise typer.Exit(2) from None
    fp = model_fingerprint(model)
    try:
        if sae_features is not None:
            if sae_layer is None:
                raise VectorImportError(
                    source, "sae_layer", "an SAE import needs --sae-layer (the layer it was trained on)"
                )
            vectors = read_sae_features(source, fp, _ints(sae_features) or [], sae_layer, sae_key)
        elif source.suffix.lower() == ".gguf":
            vectors = read_gguf_control_vector(
                source, fp, layer_offset, check_model_hint=not ignore_model_hint, layers=_ints(layers)
            )
        else:
            vectors = read_vector_file(source, fp, _ints(layers), layer_offset, key)
        path = import_vectors(vectors, fp, out, profile_id, method, scale, (lo, hi))
        profile = load_profile(path, expected_model=fp)
    except (VectorImportError, ProfileError, ValueError) as exc:
        console.print(f"[red]import failed:[/red] {escape(str(exc))}")
        raise typer.Exit(1) from None
    console.print(
        f"wrote {path}: {profile.spec.method} on layers {_layers(profile.spec.layers)} "
        f"(from {vectors.origin['format']} {escape(vectors.origin['file'])})"
    )


@app.command("export")
def export_cmd(
    profile: Path = typer.Argument(..., help="Profile directory (addition, probe or category)."),
    out: Path = typer.Option(..., help="Output .gguf (llama.cpp control vector) or .safetensors."),
    scale: float | None = typer.Option(None, help="Bake this scale in (default: the profile's default)."),
    categories: str | None = typer.Option(None, help="Category profile: comma-separated categories to sum."),
) -> None:
    """Write a profile's vectors as a GGUF control vector (direction.N at layer N's output) or safetensors."""
    from vllm_steer.calibration.interop import VectorImportError, export_gguf, export_vectors
    from vllm_steer.core.profile import ProfileError, load_profile

    cats = [c.strip() for c in categories.split(",")] if categories else None
    try:
        loaded = load_profile(profile)
        if out.suffix.lower() == ".gguf":
            export_gguf(loaded, out, scale, cats)
        elif out.suffix.lower() == ".safetensors":
            from safetensors.torch import save_file

            vectors = export_vectors(loaded, scale, cats)
            save_file(
                {f"direction.{layer}": v.contiguous() for layer, v in vectors.items()},
                str(out),
                metadata={"profile": loaded.spec.id, "convention": "direction.N is added at the output of layer N"},
            )
        else:
            raise VectorImportError(out, "out", "must end in .gguf or .safetensors")
    except (VectorImportError, ProfileError) as exc:
        console.print(f"[red]export failed:[/red] {escape(str(exc))}")
        raise typer.Exit(1) from None
    console.print(f"wrote {out}")


@profiles_app.command("list")
def list_profiles(
    directory: Path = typer.Argument(Path("profiles"), help="Directory of profile sub-directories."),
) -> None:
    """Load and validate every profile in DIRECTORY; print a summary (exit 1 on the first bad one)."""
    from vllm_steer.core.profile import ProfileError, load_profile_dir

    try:
        loaded = load_profile_dir(directory)
    except ProfileError as exc:
        console.print(f"[red]invalid profile[/red] {exc}")
        raise typer.Exit(1) from None
    table = Table(title=f"profiles in {directory}")
    for col in ("id", "method", "model", "layers", "default", "allowed"):
        table.add_column(col)
    for p in loaded.values():
        s = p.spec
        default = (
            f"angle {s.defaults.angle}"
            if s.defaults.angle is not None
            else (f"scale {s.defaults.scale}" if s.defaults.scale is not None else "-")
        )
        allowed = s.allowed.angle or s.allowed.scale
        gates = f"gates at {_layers(list(s.gating.layers))}" if s.gating is not None else ""
        table.add_row(
            s.id,
            s.method or f"gate-only ({s.gating.action if s.gating else '?'})",
            f"{s.model.architecture} d={s.model.hidden_size} L={s.model.num_layers}",
            _layers(s.layers) if s.layers else gates,
            default,
            f"[{allowed.min}, {allowed.max}]" if allowed else "-",
        )
    console.print(table)


def _layers(layers: list[int]) -> str:
    return ",".join(map(str, layers)) if len(layers) <= 8 else f"{layers[0]}..{layers[-1]} ({len(layers)})"


@app.command("default-model")
def default_model() -> None:
    """Print the path of the embedded default model (converting it from the GGUF on first use)."""
    from vllm_steer.default_model import ensure_default_model

    console.print(str(ensure_default_model()))


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover - engines spawn processes; keep the guard
    app()
