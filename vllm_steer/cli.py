"""``vllm-steer`` command line: the demo, profile inspection, the default model."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

app = typer.Typer(help="Per-request activation steering inside vLLM.", no_args_is_help=True, add_completion=False)
profiles_app = typer.Typer(help="Inspect and validate steering profiles.", no_args_is_help=True)
app.add_typer(profiles_app, name="profiles")
console = Console()


@app.command()
def demo(
    model: Optional[str] = typer.Option(None, help="HF model directory (default: the embedded SmolLM2-135M-Instruct)."),
    profiles: Optional[str] = typer.Option(None, help="Profile directory (default: the repo's profiles/)."),
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
        table.add_row(escape(f"[{row.kind}] {row.prompt}"), escape(row.setting), mark, escape(row.text.replace("\n", " ")))
    console.print(table)
    status = facts["status"]
    console.print(
        f"model {facts['model']}\nprofiles {', '.join(status['profiles'])} ({status['sites']} hook sites, {status['max_slots']} slots)\n"
        f"engine start {facts['startup_s']:.0f} s; {facts['rows']} rows, {facts['output_tokens']} tokens in one generate call "
        f"({facts['generate_s']:.1f} s)"
    )


@profiles_app.command("list")
def list_profiles(
    directory: Path = typer.Argument(Path("profiles"), help="Directory of profile sub-directories."),
) -> None:
    """Load and validate every profile in DIRECTORY; print a summary (exit 1 on the first bad one)."""
    from vllm_steer.profile import ProfileError, load_profile_dir

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
        default = f"angle {s.defaults.angle}" if s.defaults.angle is not None else (f"scale {s.defaults.scale}" if s.defaults.scale is not None else "-")
        allowed = s.allowed.angle or s.allowed.scale
        table.add_row(s.id, s.method, f"{s.model.architecture} d={s.model.hidden_size} L={s.model.num_layers}",
                      _layers(s.layers), default, f"[{allowed.min}, {allowed.max}]" if allowed else "-")
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
