"""Offline engine throughput: steered vs unsteered vs the usual hook-based way, side by side in one run.

Same model, same prompts, same output length (EOS ignored), greedy, B rows per batch:

1. ``unsteered``      — vLLM without the plugin (its own process: the plugin is never imported);
2. ``plugin-idle``    — plugin loaded, no row steered;
3. ``all:<method>``   — every row steered with one demo profile, per method;
4. ``mixed:K``        — 3/4 of the rows steered by K distinct profiles (random Selective Steering planes
   on the demo profile's layers, so K distinct slots), 1/4 unsteered;
5. ``hf:K``           — Hugging Face ``generate`` with a forward hook applying the same op, one setting
   per batch, so K settings need K batches (the usual way to steer today).

Reports output tokens/s and the ratios (2)/(1), (3)/(1), (4)/(1), vLLM mixed:K / hf:K, as JSON, a
Markdown table and a PNG (throughput vs K; overhead per method).

    .venv/bin/python benchmarks/throughput.py                  # SmolLM2, B=64, 32 tokens, eager
    .venv/bin/python benchmarks/throughput.py --modes eager,compiled --ks 1,8,32,64 --hf-ks 1,8,32
    .venv/bin/python benchmarks/throughput.py --smoke          # minimal, for the smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEMO = {  # method -> demo profile (and its setting)
    "addition": {"steer_profile": "smollm2-refusal-add"},
    "probe": {"steer_profile": "smollm2-probe"},
    "category": {"steer_profile": "smollm2-category"},
    "ablation": {"steer_profile": "smollm2-ablation"},
    "angular_standard": {"steer_profile": "smollm2-angular", "steer_angle": 120.0},
    "angular_adaptive": {"steer_profile": "smollm2-angular-adaptive", "steer_angle": 120.0},
    "selective": {"steer_profile": "smollm2-selective", "steer_angle": 120.0},
}


def _prompts(n: int) -> list[str]:
    from vllm_steer.data import cycled_prompts

    return cycled_prompts("advbench", n)


def _mixed_rows(batch: int, k: int) -> list[dict | None]:
    steered = max(k, (3 * batch) // 4)
    rows = [{"steer_profile": f"bench-k{i % k:03d}", "steer_angle": 120.0} for i in range(steered)]
    return rows + [None] * (batch - steered)


def _make_profiles(root: Path, model: str, ks: list[int], demo: Path) -> None:
    """The demo profiles plus max(K) random Selective Steering profiles on the demo's layers."""
    import shutil

    from vllm_steer.core.profile import load_profile, save_profile
    from vllm_steer.testing.synthetic import random_profile

    for sub in demo.iterdir():
        if (sub / "profile.json").exists():
            shutil.copytree(sub, root / sub.name)
    sel = load_profile(demo / "smollm2-selective")
    for i in range(max(ks)):
        p = random_profile(
            f"bench-k{i:03d}", "selective", sel.spec.model, sel.spec.layers, seed=1000 + i, shared_plane=True
        )
        save_profile(root / p.id, p.spec, p.vectors)


# ------------------------------------------------------------------ worker (one engine per process)


def _worker(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    from vllm import LLM, SamplingParams

    kwargs = dict(
        model=spec["model"],
        dtype="float32",
        seed=0,
        max_num_seqs=max(spec["batch"], 8),
        enforce_eager=spec["eager"],
        max_model_len=1024,
    )
    if spec.get("profiles"):
        kwargs["additional_config"] = {"vllm_steer": {"profiles": spec["profiles"], "max_slots": spec["max_slots"]}}
    t0 = time.time()
    llm = LLM(**kwargs)
    startup = time.time() - t0
    tok = llm.get_tokenizer()
    chats = [
        tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in spec["prompts"]
    ]
    results = {"startup_s": startup}
    for name, rows in [("warmup", [None] * len(chats))] + [(s["name"], s["rows"]) for s in spec["scenarios"]]:
        params = [
            SamplingParams(max_tokens=spec["max_tokens"], temperature=0.0, ignore_eos=True, extra_args=r) for r in rows
        ]
        start = time.perf_counter()
        outs = llm.generate(chats, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        results[name] = {"seconds": elapsed, "tokens": tokens, "tok_s": tokens / elapsed}
        print(
            f"[{'on' if spec.get('profiles') else 'off'}|{'eager' if spec['eager'] else 'compiled'}] {name}: "
            f"{tokens / elapsed:.1f} tok/s",
            flush=True,
        )
    Path(out_path).write_text(json.dumps(results))


def _run_engine(spec: dict, plugin: bool, workdir: Path) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "spec.json").write_text(json.dumps(spec))
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    if plugin:
        env.pop("VLLM_PLUGINS", None)
    else:
        env["VLLM_PLUGINS"] = "__none__"  # an allowlist matching no plugin: vllm-steer is never imported
    subprocess.run(
        [sys.executable, __file__, "--worker", str(workdir / "spec.json"), str(workdir / "out.json")],
        env=env,
        check=True,
    )
    return json.loads((workdir / "out.json").read_text())


# ------------------------------------------------------------------ the HF-hooks baseline


def _hf(model_dir: str, prompts: list[str], profiles_dir: Path, ks: list[int], batch: int, max_tokens: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_steer.core.profile import load_profile_dir
    from vllm_steer.core.request import parse_steering, resolve_steering
    from vllm_steer.testing.hf_reference import steered

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    profiles = load_profile_dir(profiles_dir)
    chats = [
        tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    results = {}
    for k in ks:
        rows = _mixed_rows(batch, k)
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(rows):
            groups.setdefault(json.dumps(r), []).append(i)
        start = time.perf_counter()
        tokens = 0
        for key, idx in groups.items():  # one batch per distinct setting: hooks hold one setting at a time
            setting = json.loads(key)
            resolved = resolve_steering(parse_steering(setting), profiles) if setting else None
            enc = tok([chats[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad(), steered(model, profiles[resolved.profile_id] if resolved else None, resolved):
                out = model.generate(
                    **enc,
                    max_new_tokens=max_tokens,
                    min_new_tokens=max_tokens,
                    do_sample=False,
                    pad_token_id=tok.pad_token_id or tok.eos_token_id,
                )
            tokens += (out.shape[1] - enc.input_ids.shape[1]) * len(idx)
        elapsed = time.perf_counter() - start
        results[f"hf:{k}"] = {"seconds": elapsed, "tokens": tokens, "tok_s": tokens / elapsed, "batches": len(groups)}
        print(f"[hf] K={k}: {tokens / elapsed:.1f} tok/s in {len(groups)} batches", flush=True)
    return results


# ------------------------------------------------------------------ report


def _report(result: dict, out: Path) -> None:
    lines = [
        (
            f"Machine: {result['machine']}; model {Path(result['model']).name}; batch {result['batch']} rows, "
            f"{result['max_tokens']} new tokens each (EOS ignored), greedy. Command: `{result['command']}`"
        ),
        "",
        "| mode | scenario | output tok/s | ratio to unsteered |",
        "|---|---|---|---|",
    ]
    for mode, runs in result["runs"].items():
        base = runs["unsteered"]["tok_s"]
        for name, r in runs.items():
            lines.append(f"| {mode} | {name} | {r['tok_s']:.1f} | {r['tok_s'] / base:.3f} |")
    if result.get("hf"):
        lines += [
            "",
            "| K distinct settings | vLLM mixed:K tok/s ("
            + ", ".join(result["runs"])
            + ") | HF hooks tok/s | vLLM / HF |",
            "|---|---|---|---|",
        ]
        for key, r in result["hf"].items():
            k = key.split(":")[1]
            vllm = [runs.get(f"mixed:{k}", {}).get("tok_s") for runs in result["runs"].values()]
            best = max(v for v in vllm if v) if any(vllm) else None
            lines.append(
                f"| {k} | {', '.join(f'{v:.1f}' if v else '–' for v in vllm)} | {r['tok_s']:.1f} | "
                f"{best / r['tok_s']:.1f}× |"
                if best
                else f"| {k} | – | {r['tok_s']:.1f} | – |"
            )
    (out.with_suffix(".md")).write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    for mode, runs in result["runs"].items():
        ks = sorted(int(n.split(":")[1]) for n in runs if n.startswith("mixed:"))
        ax1.plot(ks, [runs[f"mixed:{k}"]["tok_s"] for k in ks], marker="o", label=f"vLLM-steer ({mode})")
        ax1.axhline(runs["unsteered"]["tok_s"], ls=":", lw=0.8, label=f"unsteered ({mode})")
        methods = [n for n in runs if n.startswith("all:")]
        base = runs["unsteered"]["tok_s"]
        ax2.bar([f"{m[4:]}\n{mode}" for m in methods], [100 * (1 - runs[m]["tok_s"] / base) for m in methods])
    if result.get("hf"):
        hk = sorted(int(n.split(":")[1]) for n in result["hf"])
        ax1.plot(hk, [result["hf"][f"hf:{k}"]["tok_s"] for k in hk], marker="s", label="HF generate + hooks")
    ax1.set(xscale="log", xlabel="K distinct profiles in the batch", ylabel="output tokens/s", title="throughput vs K")
    ax1.legend(fontsize=7)
    ax2.set(ylabel="overhead vs unsteered (%)", title="all rows steered, per method")
    ax2.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help="HF model directory (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--profiles", default=str(REPO / "profiles"), help="demo profiles (one per method)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--ks", default="1,8,32,48")
    ap.add_argument("--hf-ks", default="1,8")
    ap.add_argument("--modes", default="eager")
    ap.add_argument("--methods", default=",".join(DEMO))
    ap.add_argument("--smoke", action="store_true", help="minimal run for the smoke test")
    ap.add_argument("--out", default=str(HERE / "results" / "throughput_cpu.json"))
    args = ap.parse_args()
    if args.worker:
        return _worker(*args.worker)
    if args.smoke:
        args.batch, args.max_tokens, args.ks, args.hf_ks, args.methods = 4, 4, "1,2", "1,2", "selective"
    if args.model is None:
        from vllm_steer.default_model import ensure_default_model

        args.model = str(ensure_default_model())
    ks = [int(k) for k in args.ks.split(",")]
    hf_ks = [int(k) for k in args.hf_ks.split(",") if k]
    methods = [m for m in args.methods.split(",") if m]
    prompts = _prompts(args.batch)
    work = Path(tempfile.mkdtemp(prefix="vllm-steer-bench-"))
    _make_profiles(work / "profiles", args.model, ks + hf_ks, Path(args.profiles))
    scenarios = [{"name": "plugin-idle", "rows": [None] * args.batch}]
    scenarios += [{"name": f"all:{m}", "rows": [DEMO[m]] * args.batch} for m in methods]
    scenarios += [{"name": f"mixed:{k}", "rows": _mixed_rows(args.batch, k)} for k in ks]
    result = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.platform()}",
        "model": args.model,
        "batch": args.batch,
        "max_tokens": args.max_tokens,
        "command": "python benchmarks/throughput.py " + " ".join(sys.argv[1:]),
        "runs": {},
        "hf": {},
    }
    for mode in args.modes.split(","):
        base = {
            "model": args.model,
            "eager": mode == "eager",
            "batch": args.batch,
            "max_tokens": args.max_tokens,
            "prompts": prompts,
            "max_slots": max(ks) + len(methods) + 8,
        }
        off = _run_engine(
            {**base, "scenarios": [{"name": "unsteered", "rows": [None] * args.batch}]}, False, work / f"off-{mode}"
        )
        on = _run_engine(
            {**base, "profiles": str(work / "profiles"), "scenarios": scenarios}, True, work / f"on-{mode}"
        )
        runs = {"unsteered": off["unsteered"], **{s["name"]: on[s["name"]] for s in scenarios}}
        result["runs"][mode] = runs
        result[f"startup_s_{mode}"] = {"off": off["startup_s"], "on": on["startup_s"]}
    if hf_ks:
        result["hf"] = _hf(args.model, prompts, work / "profiles", hf_ks, args.batch, args.max_tokens)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    _report(result, out)
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
