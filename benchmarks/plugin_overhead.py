"""Plugin on vs plugin off, interleaved: two engines alive side by side, batches alternating between them.

``throughput.py`` runs each engine once, minutes apart; on a machine that drifts (this 2-core VM: ±25 %
within minutes) a one-off ratio cannot tell a 5 % cost from noise. Here both engines — one without the
plugin (never imported), one with it — stay up in their own processes, and every repetition runs the
same batch on each, in alternating order, seconds apart. The report gives, per scenario, the median
and spread over repetitions of the ratio to the plugin-off run of the same repetition.

    .venv/bin/python benchmarks/plugin_overhead.py                     # compiled, B=32, 32 tokens, 5 reps
    .venv/bin/python benchmarks/plugin_overhead.py --eager --reps 3
    .venv/bin/python benchmarks/plugin_overhead.py --smoke             # minimal, for the smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULT = "@@vllm-steer-bench@@ "
SCENARIOS = ("plugin-idle", "all:selective", "mixed:8-selective", "all:ablation", "mixed:8")
"""Run on the plugin-on engine; each is divided by the plugin-off engine's unsteered run of the same repetition.

``all:selective`` steers 9 layers; ``mixed:8-selective`` the same 9 layers with 8 distinct angles (8 slots: the
cost of K at fixed sites); ``all:ablation`` every layer (the method prescribes it: the most sites one profile
can use); ``mixed:8`` seven demo profiles of every method at once, so the union of their sites is active."""


def _rows(name: str, batch: int) -> list[dict | None]:
    if name in ("unsteered", "plugin-idle"):
        return [None] * batch
    if name == "all:selective":
        return [{"steer_profile": "smollm2-selective", "steer_angle": 120.0}] * batch
    if name == "all:ablation":
        return [{"steer_profile": "smollm2-ablation"}] * batch
    if name == "mixed:8-selective":  # 3/4 of the rows over eight angles, the rest unsteered
        steered = [
            {"steer_profile": "smollm2-selective", "steer_angle": 100.0 + 20.0 * (i % 8)}
            for i in range((3 * batch) // 4)
        ]
        return steered + [None] * (batch - len(steered))
    demo = [
        "smollm2-selective",
        "smollm2-angular",
        "smollm2-angular-adaptive",
        "smollm2-refusal-add",
        "smollm2-probe",
        "smollm2-category",
        "smollm2-ablation",
        "smollm2-selective",
    ]
    angles = {"smollm2-selective": 120.0, "smollm2-angular": 120.0, "smollm2-angular-adaptive": 120.0}
    rows: list[dict | None] = []
    for i in range((3 * batch) // 4):  # mixed:8: eight settings (seven profiles, two angles) and 1/4 unsteered
        pid = demo[i % 8]
        row = {"steer_profile": pid}
        if pid in angles:
            row["steer_angle"] = angles[pid] + (60.0 if i % 8 == 7 else 0.0)
        rows.append(row)
    return rows + [None] * (batch - len(rows))


def _serve(args: argparse.Namespace) -> None:
    """Worker: one engine; read a scenario name per stdin line, answer with its timing on stdout."""
    from vllm import LLM, SamplingParams

    from vllm_steer.data import cycled_prompts

    kwargs = dict(
        model=args.model,
        dtype="float32",
        seed=0,
        max_num_seqs=max(args.batch, 8),
        enforce_eager=args.eager,
        max_model_len=1024,
    )
    if args.profiles:
        kwargs["additional_config"] = {"vllm_steer": {"profiles": args.profiles}}
    started = time.time()
    llm = LLM(**kwargs)
    tok = llm.get_tokenizer()
    prompts = cycled_prompts("advbench", args.batch)
    chats = [
        tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    llm.generate(
        chats,
        [SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)] * len(chats),
        use_tqdm=False,
    )  # warm-up
    print(RESULT + json.dumps({"ready": True, "startup_s": time.time() - started}), flush=True)
    for line in sys.stdin:
        name = line.strip()
        if not name:
            break
        params = [
            SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True, extra_args=r)
            for r in _rows(name, args.batch)
        ]
        start = time.perf_counter()
        outs = llm.generate(chats, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        print(
            RESULT + json.dumps({"name": name, "seconds": elapsed, "tokens": tokens, "tok_s": tokens / elapsed}),
            flush=True,
        )


class _Engine:
    def __init__(self, args: argparse.Namespace, plugin: bool, log: Path):
        env = dict(os.environ)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        if plugin:
            env.pop("VLLM_PLUGINS", None)
        else:
            env["VLLM_PLUGINS"] = "__none__"  # an allowlist matching no plugin: vllm-steer is never imported
        cmd = [
            sys.executable,
            __file__,
            "--serve",
            "--model",
            args.model,
            "--batch",
            str(args.batch),
            "--max-tokens",
            str(args.max_tokens),
        ] + (["--eager"] if args.eager else [])
        if plugin:
            cmd += ["--profiles", args.profiles]
        with open(log, "w") as log_fh:  # the child holds its own copy of the descriptor
            self.proc = subprocess.Popen(
                cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log_fh, text=True
            )
        self.ready = self._answer()

    def _answer(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(RESULT):
                return json.loads(line[len(RESULT) :])
        raise RuntimeError(f"engine exited with {self.proc.wait()}")

    def run(self, name: str) -> dict:
        self.proc.stdin.write(name + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("\n")
            self.proc.stdin.flush()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _summary(runs: list[dict]) -> dict:
    out = {}
    for name in SCENARIOS:
        ratios = [r[name]["tok_s"] / r["unsteered"]["tok_s"] for r in runs]
        out[name] = {
            "median_ratio": statistics.median(ratios),
            "min_ratio": min(ratios),
            "max_ratio": max(ratios),
            "median_tok_s": statistics.median(r[name]["tok_s"] for r in runs),
        }
    out["unsteered"] = {"median_tok_s": statistics.median(r["unsteered"]["tok_s"] for r in runs)}
    return out


def _table(result: dict) -> str:
    lines = [
        "| scenario | tok/s (median) | vs plugin off, same repetition: median (min–max) |",
        "|---|---|---|",
        f"| unsteered (plugin not loaded) | {result['summary']['unsteered']['median_tok_s']:.1f} | 1 |",
    ]
    for name in SCENARIOS:
        s = result["summary"][name]
        lines.append(
            f"| {name} | {s['median_tok_s']:.1f} | {s['median_ratio']:.3f} ({s['min_ratio']:.3f}–{s['max_ratio']:.3f}) |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--model", default=None, help="HF model directory (default: the embedded SmolLM2-135M-Instruct)"
    )
    parser.add_argument("--profiles", default=str(REPO / "profiles"))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--eager", action="store_true", help="enforce_eager (default: compiled)")
    parser.add_argument("--smoke", action="store_true", help="B=4, 4 tokens, 2 reps, eager")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.smoke:
        args.batch, args.max_tokens, args.reps, args.eager = 4, 4, 2, True
    if args.model is None:
        from vllm_steer.default_model import ensure_default_model

        args.model = str(ensure_default_model())
    if args.serve:
        return _serve(args)

    mode = "eager" if args.eager else "compiled"
    logs = Path(tempfile.mkdtemp(prefix="vllm-steer-overhead-"))
    off = _Engine(args, plugin=False, log=logs / "off.log")
    on = _Engine(args, plugin=True, log=logs / "on.log")
    print(f"engines up (startup {off.ready['startup_s']:.0f} s off, {on.ready['startup_s']:.0f} s on); logs in {logs}")
    runs = []
    try:
        for rep in range(args.reps):
            run: dict = {}
            order = ["unsteered", *SCENARIOS] if rep % 2 == 0 else [*SCENARIOS, "unsteered"]
            for name in order:
                engine = off if name == "unsteered" else on
                run[name] = engine.run("plugin-idle" if name == "unsteered" else name)
            runs.append(run)
            print(
                f"rep {rep + 1}/{args.reps}: " + ", ".join(f"{n} {r['tok_s']:.1f}" for n, r in run.items()), flush=True
            )
    finally:
        off.close()
        on.close()
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "config": {
            "model": args.model,
            "batch": args.batch,
            "max_tokens": args.max_tokens,
            "reps": args.reps,
            "mode": mode,
        },
        "runs": runs,
    }
    result["summary"] = _summary(runs)
    print(_table(result))
    out = args.out or REPO / "benchmarks" / "results" / f"plugin_overhead_cpu_{mode}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
