"""Server load test: the real OpenAI server on 127.0.0.1 under a concurrency sweep with a tenant mix.

Two sweeps over the same concurrency levels, interleaved level by level (mix at C, then unsteered at C,
then the next C, so slow drift on a shared box hits both alike):

1. ``mix``       — requests round-robin over the tenants of the mix (default, over the example tiers in
   ``deploy/tenants.example.yaml``: the research key unsteered, the strict key with its forced profile,
   the standard key rotating over its default and approved profiles within bounds);
2. ``unsteered`` — every request the research key with ``steer_profile: "none"``: the baseline.

Each level sends ``--requests`` requests (or stops starting new ones after ``--duration`` seconds,
whichever first) from C concurrent clients; every request streams ``/v1/chat/completions`` (or raw
``/v1/completions`` with ``--api completions``, for tiers that permit the ``completions`` control: the
example tiers' strict and standard tenants do not) with ``stream_options.include_usage``, ``ignore_eos`` and greedy sampling. Per request:
TTFT (first chunk with content), TPOT ((e2e - TTFT) / (output tokens - 1)), end-to-end latency, output
tokens (from the final usage chunk), status. Per level: p50/p99 of each, requests/s, output tokens/s,
errors by status (any 5xx or in-stream error is flagged loudly); per C the ratios mix / unsteered of
tokens/s and of p50 end-to-end latency. Writes JSON, a Markdown table (printed too) and a PNG.
A benchmark, not a test: nothing passes or fails on time.

    .venv/bin/python benchmarks/load.py                            # starts the server: default model, profiles/, example tiers
    .venv/bin/python benchmarks/load.py --concurrency 1,4,16,32 --requests 64 --duration 300
    .venv/bin/python benchmarks/load.py --url http://127.0.0.1:8000 \\
        --tenants-keys '{"strict": "demo-strict-key", "standard": "demo-standard-key", "research": "demo-research-key"}'
    .venv/bin/python benchmarks/load.py --model M --profiles P --tenants T.yaml \\
        --mix '[{"tier": "research", "key": "K1", "xargs": {"steer_profile": "none"}}, {"tier": "strict", "key": "K2", "xargs": null}]'
    .venv/bin/python benchmarks/load.py --smoke                    # concurrency 1,2; 4 requests; 4 tokens
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEMO_KEYS = {"strict": "demo-strict-key", "standard": "demo-standard-key", "research": "demo-research-key"}
UNSTEERED = {"steer_profile": "none"}
# The default mix over the example tiers (deploy/tenants.example.yaml) and the demo profiles: one tenant
# per tier; the standard tenant rotates over its default and its approved profiles, inside the bounds.
DEFAULT_MIX = [
    {"tier": "research", "xargs": UNSTEERED},
    {"tier": "strict", "xargs": None},  # forced smollm2-refusal-add at 0.25
    {"tier": "standard", "xargs": None},  # the tier default: smollm2-selective at 180
    {"tier": "standard", "xargs": {"steer_profile": "smollm2-selective", "steer_angle": 150.0}},
    {"tier": "standard", "xargs": {"steer_profile": "smollm2-selective", "steer_angle": 210.0}},
    {
        "tier": "standard",
        "xargs": {"steer_profile": "smollm2-category", "steer_scale": -2.0, "steer_categories": ["generic"]},
    },
]


# ------------------------------------------------------------------ the server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``vllm-steer serve`` in its own process group; stopped by that group, never by name."""

    def __init__(self, args: argparse.Namespace, max_seqs: int, log: Path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [
            sys.executable,
            "-m",
            "vllm_steer.cli",
            "serve",
            "--plugin",
            "vllm_steer",
            "--steer-profiles",
            str(args.profiles),
            "--steer-tenants",
            str(args.tenants),
            str(args.model),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dtype",
            args.dtype,
            "--seed",
            "0",
            "--max-model-len",
            str(args.max_model_len),
            "--max-num-seqs",
            str(max_seqs),
        ]
        if not args.compiled:
            cmd.append("--enforce-eager")
        cmd += shlex.split(args.server_args or "")
        self.cmd = cmd
        env = dict(os.environ)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        for key in ("VLLM_PLUGINS", "VLLM_STEER_PROFILES", "VLLM_STEER_TENANTS"):
            env.pop(key, None)  # the serve command sets them from its options
        with open(log, "w") as log_fh:  # the child holds its own copy of the descriptor
            self.proc = subprocess.Popen(cmd, env=env, stdout=log_fh, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_healthy(self, timeout: float) -> float:
        import httpx

        start = time.time()
        while time.time() - start < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; log tail:\n{self.tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return time.time() - start
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise RuntimeError(f"server not healthy after {timeout:.0f} s; log tail:\n{self.tail()}")

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
            except ProcessLookupError:
                pass


# ------------------------------------------------------------------ requests


def _prompts(n: int) -> list[str]:
    from vllm_steer.data import cycled_prompts

    return cycled_prompts("alpaca", n)


def _label(entry: dict) -> str:
    if entry.get("label"):
        return entry["label"]
    x = entry.get("xargs")
    if x is None:
        return f"{entry['tier']} (tier default)"
    if x == UNSTEERED:
        return f"{entry['tier']} unsteered"
    rest = ",".join(f"{k[6:]}={v}" for k, v in x.items() if k != "steer_profile")
    return f"{entry['tier']} {x.get('steer_profile', '?')}" + (f" {rest}" if rest else "")


def _resolve(entries: list[dict], keys: dict[str, str]) -> list[dict]:
    out = []
    for e in entries:
        if not isinstance(e, dict) or "tier" not in e:
            raise SystemExit(f"--mix: every entry needs a 'tier': {e!r}")
        key = e.get("key") or keys.get(e["tier"])
        if not key:
            raise SystemExit(f"--mix: no key for tier {e['tier']!r} (give 'key' in the entry or --tenants-keys)")
        xargs = e.get("xargs")
        if xargs is not None and not isinstance(xargs, dict):
            raise SystemExit(f"--mix: 'xargs' must be an object or null: {e!r}")
        out.append({"tier": e["tier"], "key": key, "xargs": xargs, "label": _label(e)})
    return out


def _round_robin(entries: list[dict]):
    """Request i -> entry: round-robin over the tenants (tiers, in first-seen order), then over each tenant's entries."""
    tiers: dict[str, list[dict]] = {}
    for e in entries:
        tiers.setdefault(e["tier"], []).append(e)
    groups = list(tiers.values())

    def pick(i: int) -> dict:
        group = groups[i % len(groups)]
        return group[(i // len(groups)) % len(group)]

    return pick


def _body(args, model: str, prompt: str, entry: dict, max_tokens: int, stream: bool) -> dict:
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    if args.api == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if entry["xargs"] is not None:
        body["vllm_xargs"] = entry["xargs"]
    return body


def _path(args) -> str:
    return "/v1/chat/completions" if args.api == "chat" else "/v1/completions"


async def _one(client, args, url: str, model: str, prompt: str, entry: dict) -> dict:
    """One streamed request: status, TTFT, e2e, output tokens (from the final usage chunk)."""
    import httpx

    body = _body(args, model, prompt, entry, args.max_tokens, stream=True)
    headers = {"authorization": f"Bearer {entry['key']}"}
    rec = {
        "label": entry["label"],
        "tier": entry["tier"],
        "status": None,
        "code": None,
        "ttft": None,
        "e2e": None,
        "tokens": None,
        "chunks": 0,
    }
    first_any = None
    t0 = time.perf_counter()
    try:
        async with client.stream("POST", url + _path(args), json=body, headers=headers) as resp:
            rec["code"] = resp.status_code
            if resp.status_code != 200:
                rec["status"] = str(resp.status_code)
                rec["error"] = (await resp.aread()).decode(errors="replace")[:300]
                return rec
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:].strip()
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj or obj.get("object") == "error":  # errors after the 200 arrive in the stream
                    err = obj.get("error") if isinstance(obj.get("error"), dict) else obj
                    rec["code"] = int(err.get("code") or 500)
                    rec["status"] = f"stream:{rec['code']}"
                    rec["error"] = str(err.get("message"))[:300]
                    return rec
                choices = obj.get("choices") or []
                if choices:
                    now = time.perf_counter()
                    rec["chunks"] += 1
                    first_any = first_any or now
                    c = choices[0]
                    content = c.get("text") or (c.get("delta") or {}).get("content")
                    if rec["ttft"] is None and content:
                        rec["ttft"] = now - t0
                if obj.get("usage"):
                    rec["tokens"] = obj["usage"].get("completion_tokens")
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        rec["status"] = f"exception:{type(e).__name__}"
        rec["error"] = str(e)[:300]
        return rec
    rec["e2e"] = time.perf_counter() - t0
    if rec["ttft"] is None and first_any is not None:  # only empty-text chunks (e.g. partial UTF-8): first chunk
        rec["ttft"] = first_any - t0
    if rec["tokens"] is None:  # no usage chunk: count content chunks (one token each without speculative decoding)
        rec["tokens"], rec["usage_missing"] = rec["chunks"], True
    rec["status"] = "200"
    return rec


async def _level(client, args, url: str, model: str, prompts: list[str], pick, conc: int, progress, task) -> dict:
    records: list[dict] = []
    state = {"next": 0}
    start = time.perf_counter()
    deadline = start + args.duration

    async def worker():
        while state["next"] < args.requests and time.perf_counter() < deadline:
            i = state["next"]
            state["next"] += 1
            records.append(await _one(client, args, url, model, prompts[i], pick(i)))
            progress.advance(task)

    await asyncio.gather(*(worker() for _ in range(conc)))
    wall = time.perf_counter() - start
    return _aggregate(records, wall, conc, args.requests)


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=float), q))


def _aggregate(records: list[dict], wall: float, conc: int, planned: int) -> dict:
    ok = [r for r in records if r["status"] == "200"]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    e2e = [r["e2e"] for r in ok]
    tpot = [(r["e2e"] - r["ttft"]) / (r["tokens"] - 1) for r in ok if r["ttft"] is not None and (r["tokens"] or 0) > 1]
    tokens = sum(r["tokens"] or 0 for r in ok)
    statuses: dict[str, int] = {}
    for r in records:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    by_label: dict[str, dict] = {}
    for r in records:
        b = by_label.setdefault(r["label"], {"requests": 0, "ok": 0, "tokens": 0, "e2e": []})
        b["requests"] += 1
        if r["status"] == "200":
            b["ok"] += 1
            b["tokens"] += r["tokens"] or 0
            b["e2e"].append(r["e2e"])
    for b in by_label.values():
        b["e2e_p50_s"] = _pct(b.pop("e2e"), 50)
    return {
        "concurrency": conc,
        "planned": planned,
        "sent": len(records),
        "ok": len(ok),
        "wall_s": wall,
        "stopped_by_duration": len(records) < planned,
        "req_s": len(ok) / wall if wall else 0.0,
        "out_tok_s": tokens / wall if wall else 0.0,
        "output_tokens": tokens,
        "ttft_p50_s": _pct(ttft, 50),
        "ttft_p99_s": _pct(ttft, 99),
        "tpot_p50_s": _pct(tpot, 50),
        "tpot_p99_s": _pct(tpot, 99),
        "e2e_p50_s": _pct(e2e, 50),
        "e2e_p99_s": _pct(e2e, 99),
        "statuses": statuses,
        "errors": len(records) - len(ok),
        "server_errors_5xx": sum(1 for r in records if (r["code"] or 0) >= 500),
        "stream_errors": sum(1 for r in records if str(r["status"]).startswith("stream:")),
        "usage_missing": sum(1 for r in ok if r.get("usage_missing")),
        "error_examples": sorted({f"{r['status']}: {r.get('error', '')}" for r in records if r["status"] != "200"})[:5],
        "by_label": by_label,
    }


async def _sweep(args, url: str, model: str, mix: list[dict], baseline: dict, levels: list[int], console) -> dict:
    import httpx
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    prompts = _prompts(args.requests)
    sweeps = {"mix": _round_robin(mix), "unsteered": lambda i: baseline}
    results: dict[str, dict] = {name: {} for name in sweeps}
    limits = httpx.Limits(max_connections=max(levels) + 4, max_keepalive_connections=max(levels) + 4)
    timeout = httpx.Timeout(args.request_timeout, connect=30.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        # Warm-up (not measured): one short request per distinct setting; a setting the server refuses stops the run.
        for entry in {json.dumps([e["key"], e["xargs"]]): e for e in [*mix, baseline]}.values():
            body = _body(args, model, prompts[0], entry, 2, stream=False)
            r = await client.post(url + _path(args), json=body, headers={"authorization": f"Bearer {entry['key']}"})
            if r.status_code != 200:
                raise SystemExit(
                    f"warm-up refused for {entry['label']!r} ({entry['xargs']}): {r.status_code} {r.text[:500]}"
                )
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console) as progress:
            overall = progress.add_task("all levels", total=2 * len(levels) * args.requests)
            for conc in levels:
                for name, pick in sweeps.items():
                    task = progress.add_task(f"{name:>9} c={conc}", total=args.requests)
                    level = await _level(client, args, url, model, prompts, pick, conc, progress, task)
                    results[name][str(conc)] = level
                    progress.update(task, completed=args.requests, visible=False)
                    progress.advance(overall, args.requests)
                    progress.console.print(
                        f"{name:>9} c={conc:<3} {level['ok']}/{level['sent']} ok  {level['out_tok_s']:.1f} tok/s  "
                        f"e2e p50 {_ms(level['e2e_p50_s'])} ms"
                        + (
                            f"  [red]errors {', '.join(f'{k}×{v}' for k, v in level['statuses'].items() if k != '200')}[/red]"
                            if level["errors"]
                            else ""
                        )
                    )
    return results


# ------------------------------------------------------------------ report


def _ms(v: float | None) -> str:
    return "–" if v is None else f"{1000 * v:.0f}" if v >= 0.1 else f"{1000 * v:.1f}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _report(result: dict, out: Path) -> str:
    lines = [
        (
            f"Machine: {result['machine']}; model {Path(result['model']).name}; server {result['server']}; "
            f"{result['max_tokens']} new tokens per request (EOS ignored), greedy, streamed `{result['endpoint']}`; "
            f"up to {result['requests']} requests or {result['duration_s']:.0f} s per level. "
            f"Command: `{result['command']}`"
        ),
        "",
        "Mix (round-robin over tenants): " + "; ".join(f"`{e['label']}`" for e in result["mix"]),
        "",
        "| sweep | C | ok/sent | errors | req/s | out tok/s | TTFT p50 / p99 ms | TPOT p50 / p99 ms | e2e p50 / p99 ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, levels in result["sweeps"].items():
        for conc, r in levels.items():
            errs = ", ".join(f"{k}×{v}" for k, v in r["statuses"].items() if k != "200") or "0"
            lines.append(
                f"| {name} | {conc} | {r['ok']}/{r['sent']} | {errs} | {r['req_s']:.2f} | {r['out_tok_s']:.1f} | "
                f"{_ms(r['ttft_p50_s'])} / {_ms(r['ttft_p99_s'])} | {_ms(r['tpot_p50_s'])} / {_ms(r['tpot_p99_s'])} | "
                f"{_ms(r['e2e_p50_s'])} / {_ms(r['e2e_p99_s'])} |"
            )
    lines += ["", "| C | tok/s mix / unsteered | p50 e2e mix / unsteered |", "|---|---|---|"]
    for conc, r in result["ratios"].items():
        f = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
        lines.append(f"| {conc} | {f(r['out_tok_s'])} | {f(r['e2e_p50'])} |")
    if result["server_errors_5xx"] or result["stream_errors"]:
        lines += [
            "",
            f"**SERVER ERRORS: {result['server_errors_5xx']} × 5xx, {result['stream_errors']} in-stream errors.**",
        ]
    text = "\n".join(lines) + "\n"
    out.with_suffix(".md").write_text(text)

    from vllm_steer.evaluation.plotting import pyplot, save

    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, levels in result["sweeps"].items():
        cs = [int(c) for c in levels]
        rs = list(levels.values())
        line = ax1.plot(cs, [r["out_tok_s"] for r in rs], marker="o", label=name)[0]
        for q, style in (("p50", "-"), ("p99", "--")):
            ax2.plot(
                cs,
                [1000 * (r[f"e2e_{q}_s"] or float("nan")) for r in rs],
                marker="o",
                ls=style,
                color=line.get_color(),
                label=f"{name} {q}",
            )
    ax1.set(xscale="log", xlabel="concurrent clients", ylabel="output tokens/s", title="throughput")
    ax2.set(xscale="log", xlabel="concurrent clients", ylabel="end-to-end latency (ms)", title="latency")
    for ax in (ax1, ax2):
        ax.set_xticks([int(c) for c in result["ratios"]], [str(c) for c in result["ratios"]])
        ax.legend(fontsize=8)
    save(fig, out.with_suffix(".png"))
    return text


# ------------------------------------------------------------------ main


def _command(secrets: list[str]) -> str:
    """This run's command line with every API key replaced by <key> (keys never reach the results)."""
    argv = []
    for a in sys.argv[1:]:
        for key in sorted(set(secrets), key=len, reverse=True):
            a = a.replace(key, "<key>")
        argv.append(shlex.quote(a))
    return "python benchmarks/load.py " + " ".join(argv)


def _sigterm(*_):
    raise SystemExit(143)  # run the finally blocks (the server started here is stopped)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--url", help="attach to a running server at this URL instead of starting one")
    ap.add_argument(
        "--tenants-keys", help='JSON {"tier": "key"} for the mix (default: the demo keys of the example tenants file)'
    )
    ap.add_argument(
        "--mix",
        help='JSON list of {"tier", "key" (optional: from --tenants-keys), "xargs": {...} | null, "label"?}; '
        "requests round-robin over the tiers, then over each tier's entries",
    )
    ap.add_argument(
        "--baseline",
        help='JSON entry for the unsteered sweep (default: the mix\'s first {"steer_profile": "none"} '
        "entry, else the research tier with it)",
    )
    ap.add_argument(
        "--model", help="HF model directory when starting the server (default: the embedded SmolLM2-135M-Instruct)"
    )
    ap.add_argument("--profiles", default=str(REPO / "profiles"))
    ap.add_argument("--tenants", default=str(REPO / "deploy" / "tenants.example.yaml"))
    ap.add_argument(
        "--compiled", action="store_true", help="start the server without --enforce-eager (torch.compile; slower start)"
    )
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument(
        "--server-args", default="", help="more vLLM arguments for the started server (one shell-quoted string)"
    )
    ap.add_argument("--startup-timeout", type=float, default=900)
    ap.add_argument(
        "--api",
        choices=("completions", "chat"),
        default="chat",
        help="chat (default; every tier may chat) or raw completions (the tier must permit the `completions` control)",
    )
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--requests", type=int, default=32, help="requests per level")
    ap.add_argument("--duration", type=float, default=180, help="seconds per level after which no new request starts")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--request-timeout", type=float, default=600)
    ap.add_argument(
        "--smoke", action="store_true", help="minimal run for the smoke test: concurrency 1,2; 4 requests; 4 tokens"
    )
    ap.add_argument("--out", default=str(HERE / "results" / "load_cpu.json"))
    args = ap.parse_args()
    if args.smoke:
        args.concurrency, args.requests, args.max_tokens = "1,2", 4, 4
    levels = [int(c) for c in args.concurrency.split(",") if c]
    keys = json.loads(args.tenants_keys) if args.tenants_keys else dict(DEMO_KEYS)
    mix = _resolve(json.loads(args.mix) if args.mix else DEFAULT_MIX, keys)
    if args.baseline:
        baseline = _resolve([json.loads(args.baseline)], keys)[0]
    else:
        baseline = (
            next((dict(e) for e in mix if e["xargs"] == UNSTEERED), None)
            or _resolve([{"tier": "research", "xargs": UNSTEERED}], keys)[0]
        )
    baseline["label"] = "unsteered (baseline)"

    from rich.console import Console

    console = Console(stderr=True)
    signal.signal(signal.SIGTERM, _sigterm)
    server = None
    try:
        if args.url:
            url, server_desc = args.url.rstrip("/"), args.url
        else:
            if args.model is None:
                from vllm_steer.default_model import ensure_default_model

                args.model = str(ensure_default_model())
            log = Path(tempfile.mkdtemp(prefix="vllm-steer-load-")) / "server.log"
            server = Server(args, max(max(levels), 8), log)
            with console.status(f"starting the server on {server.url} (log {log})"):
                startup = server.wait_healthy(args.startup_timeout)
            console.print(f"server healthy after {startup:.0f} s")
            url, server_desc = (
                server.url,
                f"started here ({'compiled' if args.compiled else 'eager'}, {startup:.0f} s to healthy)",
            )
        import httpx

        models = httpx.get(url + "/v1/models", headers={"authorization": f"Bearer {mix[0]['key']}"}, timeout=30)
        models.raise_for_status()
        model = models.json()["data"][0]["id"]
        sweeps = asyncio.run(_sweep(args, url, model, mix, baseline, levels, console))
    finally:
        if server is not None:
            server.stop()

    ratios = {
        str(c): {
            "out_tok_s": _ratio(sweeps["mix"][str(c)]["out_tok_s"], sweeps["unsteered"][str(c)]["out_tok_s"]),
            "e2e_p50": _ratio(sweeps["mix"][str(c)]["e2e_p50_s"], sweeps["unsteered"][str(c)]["e2e_p50_s"]),
        }
        for c in levels
    }
    all_levels = [r for s in sweeps.values() for r in s.values()]
    result = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.platform()}",
        "model": args.model or model,
        "server": server_desc,
        "endpoint": _path(args),
        "max_tokens": args.max_tokens,
        "requests": args.requests,
        "duration_s": args.duration,
        "concurrency": levels,
        "command": _command([*keys.values(), *(e["key"] for e in [*mix, baseline])]),
        "mix": [{k: e[k] for k in ("tier", "label", "xargs")} for e in mix],
        "baseline": {k: baseline[k] for k in ("tier", "label", "xargs")},
        "order": "interleaved per level: mix then unsteered",
        "sweeps": sweeps,
        "ratios": ratios,
        "server_errors_5xx": sum(r["server_errors_5xx"] for r in all_levels),
        "stream_errors": sum(r["stream_errors"] for r in all_levels),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(_report(result, out))
    if result["server_errors_5xx"] or result["stream_errors"]:
        console.print(
            f"[bold red]SERVER ERRORS: {result['server_errors_5xx']} × 5xx, {result['stream_errors']} in-stream "
            f"errors — see error_examples in {out}[/bold red]"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
