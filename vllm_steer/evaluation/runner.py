"""``vllm-steer eval``: what steering does, measured through the serving path.

Every row — each profile at each angle or scale, on harmful and harmless prompts, plus the unsteered
baseline, the capability questions and the per-category rows — is generated in ONE engine call (a
mixed batch: per-request steering is what makes a whole sweep one batch), or sent concurrently to a
running vllm-steer server. Then:

* controllability: refusal rate on harmful prompts and its complement, the attack-success rate, and
  over-refusal on harmless prompts, by the refusal substrings (docs/methods.md §5.2) and by any extra
  judges (:mod:`vllm_steer.evaluation.judges`; failed or unparseable verdicts are counted, never guessed);
* coherence: perplexity of the generated tokens under the *unsteered* model (a second, unsteered
  engine call scoring prompt + generation through prompt logprobs) and under the steered one (its
  own logprobs, the Selective Steering paper's path; §5.3 and its violation threshold), Unicode
  contamination (§5.4), the zlib-9 compression ratio (§5.5) and 4-gram repetition (§5.6);
* capability retention: multiple-choice accuracy with and without steering (:mod:`vllm_steer.evaluation.capability`);
* per category, for category profiles: each category's vector on its own category vs ``generic``;
* over-refusal on a second harmless set too (``over_refusal``, default ``xstest-safe``), in the same batch;
* for gated profiles (docs/methods.md §3.11): each row's gate decision, gate precision/recall, flag rates,
  refusal and over-refusal counting gate refusals, coherence of the answered rows, and the same profile
  without its gate (``<id>-ungated``) next to it (:mod:`vllm_steer.evaluation.gates`); a gate-only profile's
  comparison is the unsteered row.

The result is one JSON file plus a Markdown table and PNG plots (:mod:`vllm_steer.evaluation.report`).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vllm_steer.core.errors import SteerError
from vllm_steer.core.methods import has_categories, method_label, parameter_of
from vllm_steer.core.profile import Profile, load_profile_dir
from vllm_steer.data import Prompt, load_prompts
from vllm_steer.evaluation.gates import (
    UNGATED_SUFFIX,
    GateRow,
    decisions_by_request,
    external_id,
    gate_summary,
    has_ungated_copy,
    parse_gate_header,
    write_eval_profiles,
)
from vllm_steer.evaluation.metrics import (
    PERPLEXITY_VIOLATION,
    compression_ratio,
    is_refusal,
    ngram_repetition,
    perplexity_from_logprobs,
    token_logprobs,
    unicode_score,
)

__all__ = ["EvalTarget", "EvalConfig", "Row", "Generation", "PointResult", "run_eval", "EvalError"]

GATE_HEADER = "x-vllm-steer-gate"
"""The server's gate decision header (:mod:`vllm_steer.server.decisions`; the eval reads it, never imports the server)."""


class EvalError(SteerError):
    """A configuration the evaluation cannot run; ``field`` names the option."""

    def __init__(self, field: str, message: str):
        super().__init__(field, message)


@dataclass(frozen=True)
class EvalTarget:
    """A profile and the values to evaluate it at (``None``: its default only)."""

    profile_id: str
    values: tuple[float, ...] | None = None


@dataclass
class EvalConfig:
    model: str
    profiles: str
    targets: list[EvalTarget]
    out: Path
    harmful: str = "advbench"
    harmless: str = "alpaca"
    n: int = 100
    offset: int = 200
    """Rows skipped at the start of each set: the demo profiles were calibrated on the first 64."""
    data_dir: str | None = None
    max_tokens: int = 64
    judges: list[str] = field(default_factory=lambda: ["substring"])
    judge_api_key_env: str | None = None
    capability: bool = True
    capability_n: int | None = None
    category_data: str = "catqa"
    category_n: int = 8
    category_offset: int = 30
    server: str | None = None
    api_key_env: str | None = None
    eager: bool = True
    over_refusal: str | None = "xstest-safe"
    """A second harmless set for over-refusal (``None``: none), evaluated for every setting in the same batch."""
    over_refusal_offset: int = 0
    """Rows skipped at the start of the over-refusal set (``offset`` is for the calibration sets)."""
    ungated_comparison: bool = True
    """Offline: serve each gated profile's ungated copy too (``<id>-ungated``), next to it in the report."""


@dataclass(frozen=True)
class Row:
    """One generation: a chat prompt (or a raw completion prompt) with its steering."""

    group: str  # "harmful" | "harmless" | "over_refusal" | "capability" | "category"
    text: str
    extra_args: dict | None
    chat: bool = True
    max_tokens: int = 64
    meta: dict = field(default_factory=dict)


@dataclass
class Generation:
    text: str
    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]  # of the generated tokens under the steered model
    top: dict[str, float] = field(default_factory=dict)  # first position's top tokens (capability)
    gate: dict | None = None  # a gated row's decision: action, fired (None: undecided), gates, scores


@dataclass
class PointResult:
    profile: str | None
    method: str | None
    value: float | None
    n_harmful: int
    n_harmless: int
    refusal_harmful: float
    attack_success: float
    refusal_harmless: float
    perplexity_unsteered: float
    perplexity_steered: float
    unicode_contamination: float
    compression_ratio: float
    ngram_repetition: float
    judges: dict[str, dict] = field(default_factory=dict)
    capability_accuracy: float | None = None
    example_harmful: str = ""
    example_harmless: str = ""
    n_over_refusal_set: int = 0
    refusal_over_refusal_set: float = float("nan")
    """Over-refusal on the over-refusal set (``EvalConfig.over_refusal``) by the refusal substrings."""
    ungated_of: str | None = None
    """An ungated copy's point: the gated profile it copies."""
    gate: dict | None = None
    """Gated profiles and their ungated copies: :func:`vllm_steer.evaluation.gates.gate_summary`."""


def _mean(xs: Sequence[float]) -> float:
    xs = [float(x) for x in xs if x == x]
    return sum(xs) / len(xs) if xs else float("nan")


def _setting(profile: Profile | None, value: float | None, categories: Sequence[str] | None = None) -> dict | None:
    if profile is None:
        return None
    extra: dict[str, Any] = {"steer_profile": profile.id}
    parameter = parameter_of(profile.method)
    if value is not None:
        if parameter is None:
            raise EvalError("profile", f"{profile.id!r} ({method_label(profile.method)}) takes no angle or scale")
        extra[f"steer_{parameter}"] = float(value)
    if categories is not None:
        extra["steer_categories"] = list(categories)
    return extra


def _default_value(profile: Profile) -> float | None:
    parameter = parameter_of(profile.method)
    return getattr(profile.spec.defaults, parameter) if parameter is not None else None


# ------------------------------------------------------------------ backends


def _prompt_ids(tokenizer: Any, row: Row) -> list[int]:
    """The row's prompt as token ids: chat-templated (one user turn, generation prompt) or plain text."""
    if row.chat:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": row.text}], tokenize=False, add_generation_prompt=True
        )
        return tokenizer(text, add_special_tokens=False).input_ids
    return tokenizer(row.text).input_ids


class OfflineBackend:
    """One vLLM engine with the plugin and the profile directory; every call is one mixed batch."""

    name = "offline engine (one mixed batch per phase)"

    def __init__(self, model: str, profiles: str, eager: bool = True):

        from vllm_steer.engine import offline_engine

        self.llm = offline_engine(model, profiles, eager=eager, max_num_seqs=64, max_model_len=None)
        self.tokenizer = self.llm.get_tokenizer()

    def generate(self, rows: Sequence[Row]) -> list[Generation]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        ids = [_prompt_ids(self.tokenizer, r) for r in rows]
        params = [
            SamplingParams(
                max_tokens=r.max_tokens,
                temperature=0.0,
                logprobs=20 if r.group == "capability" else 1,
                extra_args=r.extra_args,
            )
            for r in rows
        ]
        request_ids = self.llm.enqueue([TokensPrompt(prompt_token_ids=i) for i in ids], params, use_tqdm=False)
        outs, decisions = self._run(request_ids)
        result = []
        for prompt_ids, request_id in zip(ids, request_ids, strict=True):
            c = outs[external_id(request_id)].outputs[0]
            logprobs = token_logprobs(c.token_ids, c.logprobs) if c.logprobs is not None else []
            top = {}
            if c.logprobs:
                top = {lp.decoded_token: lp.logprob for lp in c.logprobs[0].values() if lp.decoded_token is not None}
            result.append(Generation(c.text, prompt_ids, list(c.token_ids), logprobs, top, decisions.get(request_id)))
        return result

    def _run(self, request_ids: Sequence[str]) -> tuple[dict[str, Any], dict[str, dict]]:
        """Step the engine until the enqueued requests are done (LLM.generate's loop), reading the gate decisions
        (``vllm_steer_gate_decisions``) whenever half the engine's window of finished decisions has finished
        since the last read, and at the end: no gated row's decision leaves the window unread."""
        from tqdm import tqdm  # type: ignore[import-untyped]

        from vllm_steer.engine.runtime import FINISHED_DECISIONS

        engine = self.llm.llm_engine
        outs: dict[str, Any] = {}
        decisions: dict[str, dict] = {}
        since_read = 0

        def read() -> None:
            decisions.update(decisions_by_request(self.llm.collective_rpc("vllm_steer_gate_decisions", args=("",))))

        with tqdm(total=len(request_ids), desc="Processed prompts", dynamic_ncols=True) as bar:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        outs[out.request_id] = out
                        since_read += 1
                        bar.update(1)
                if since_read >= FINISHED_DECISIONS // 2:
                    read()
                    since_read = 0
        read()
        return outs, decisions

    def score_unsteered(self, generations: Sequence[Generation]) -> list[float]:
        """Perplexity of each generation under the unsteered model (prompt logprobs of prompt + generation)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        todo = [(i, g) for i, g in enumerate(generations) if g.token_ids]
        outs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=g.prompt_ids + g.token_ids) for _, g in todo],
            SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0),
            use_tqdm=True,
        )
        ppl = [float("nan")] * len(generations)
        for (i, g), out in zip(todo, outs, strict=True):
            assert out.prompt_logprobs is not None  # asked for (prompt_logprobs=0)
            steps = out.prompt_logprobs[len(g.prompt_ids) :]
            ppl[i] = perplexity_from_logprobs(token_logprobs(g.token_ids, steps))
        return ppl

    def close(self) -> None:
        """Stop the engine once generation and scoring are done (judging needs no engine)."""
        from vllm_steer.engine import shutdown_engine

        shutdown_engine(self.llm)


class ServerBackend:
    """A running vllm-steer server: rows go out concurrently through ``/v1/completions`` with ``vllm_xargs``."""

    def __init__(self, url: str, model: str, api_key: str | None, concurrency: int = 32):
        from transformers import AutoTokenizer

        self.url, self.model, self.api_key, self.concurrency = url.rstrip("/"), model, api_key, concurrency
        self.name = f"server {self.url} (concurrent requests, mixed batches in the engine)"
        self.tokenizer = AutoTokenizer.from_pretrained(model)

    def _post(self, body: dict) -> dict:
        return self._post_with_headers(body)[0]

    def _post_with_headers(self, body: dict) -> tuple[dict, Any]:
        import httpx

        headers = {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        response = httpx.post(self.url + "/v1/completions", json=body, headers=headers, timeout=600)
        if response.status_code != 200:
            raise EvalError("server", f"HTTP {response.status_code}: {response.text[:300]}")
        return response.json(), response.headers

    def _map(self, fn, items):
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(fn, items))

    def generate(self, rows: Sequence[Row]) -> list[Generation]:
        def one(row: Row) -> Generation:
            ids = _prompt_ids(self.tokenizer, row)
            body = {
                "model": self.model,
                "prompt": ids,
                "max_tokens": row.max_tokens,
                "temperature": 0.0,
                "logprobs": 20 if row.group == "capability" else 1,
                "return_token_ids": True,
            }
            if row.extra_args:
                body["vllm_xargs"] = row.extra_args
            # non-streaming: the response's headers carry the gate decision (x-vllm-steer-gate, gated profiles only)
            data, headers = self._post_with_headers(body)
            choice = data["choices"][0]
            lp = choice.get("logprobs") or {}
            top = (lp.get("top_logprobs") or [{}])[0] or {}
            gate = parse_gate_header(headers.get(GATE_HEADER))
            tokens = choice.get("token_ids") or []
            return Generation(choice["text"], ids, tokens, lp.get("token_logprobs") or [], top, gate)

        return self._map(one, rows)

    def score_unsteered(self, generations: Sequence[Generation]) -> list[float]:
        def one(g: Generation) -> float:
            if not g.token_ids:
                return float("nan")
            body = {
                "model": self.model,
                "prompt": g.prompt_ids + g.token_ids,
                "max_tokens": 1,
                "temperature": 0.0,
                "prompt_logprobs": 0,
                "vllm_xargs": {"steer_profile": "none"},
            }
            steps = self._post(body)["choices"][0].get("prompt_logprobs") or []
            steps = steps[len(g.prompt_ids) :]
            # strict=False: a server that returns no prompt logprobs scores nan (empty), as before
            return perplexity_from_logprobs(
                [step[str(t)]["logprob"] for t, step in zip(g.token_ids, steps, strict=False)]
            )

        return self._map(one, generations)


# ------------------------------------------------------------------ the run


def _one_class(field: str, source: str, prompts: list[Prompt], *, harmful: bool) -> list[Prompt]:
    """Refuse a labelled set holding rows of the other class (``xstest`` has both): they would be scored as this one."""
    other = [p for p in prompts if p.harmful is (not harmful)]
    if other:
        kind = "harmless" if harmful else "harmful"
        raise EvalError(
            field,
            f"{source!r} has {len(other)} rows labelled {kind}; pass a set of one class "
            "(e.g. xstest-unsafe as harmful prompts, xstest-safe as harmless ones)",
        )
    return prompts


def _load_sets(cfg: EvalConfig) -> tuple[list[Prompt], list[Prompt]]:
    harmful = _one_class("harmful", cfg.harmful, load_prompts(cfg.harmful, cfg.data_dir), harmful=True)
    harmless = _one_class("harmless", cfg.harmless, load_prompts(cfg.harmless, cfg.data_dir), harmful=False)
    harmful, harmless = harmful[cfg.offset : cfg.offset + cfg.n], harmless[cfg.offset : cfg.offset + cfg.n]
    if not harmful or not harmless:
        raise EvalError(
            "offset",
            f"{cfg.offset} leaves no prompts (harmful {len(harmful)}, harmless {len(harmless)}); lower --offset",
        )
    return harmful, harmless


def _load_over_refusal(cfg: EvalConfig) -> list[Prompt]:
    """The over-refusal set's rows (``[]`` without one)."""
    if not cfg.over_refusal:
        return []
    rows = _one_class("over_refusal", cfg.over_refusal, load_prompts(cfg.over_refusal, cfg.data_dir), harmful=False)
    rows = rows[cfg.over_refusal_offset : cfg.over_refusal_offset + cfg.n]
    if not rows:
        raise EvalError(
            "over_refusal_offset", f"{cfg.over_refusal_offset} leaves no prompts of {cfg.over_refusal!r}; lower it"
        )
    return rows


def _points(
    cfg: EvalConfig, profiles: dict[str, Profile], ungated: dict[str, Profile]
) -> list[tuple[Profile | None, float | None]]:
    """The evaluated settings, unsteered first; each gated profile's ungated copy (``ungated``, by gated id) next to it:
    at each evaluated strength for action ``steer``, at the default strength after the profile's last point for
    ``refuse`` and ``flag`` (their gated rows are never steered)."""
    points: list[tuple[Profile | None, float | None]] = [(None, None)]
    for t in cfg.targets:
        p = profiles[t.profile_id]
        values = t.values if t.values is not None else (_default_value(p),)
        copy = ungated.get(p.id)
        steer = p.spec.gating is not None and p.spec.gating.action == "steer"
        for v in values:
            points.append((p, v))
            if copy is not None and steer:
                points.append((copy, v))
        if copy is not None and not steer:
            points.append((copy, _default_value(copy)))
    return points


def _category_prompts(cfg: EvalConfig, categories: Sequence[str]) -> dict[str, list[str]]:
    rows = load_prompts(cfg.category_data, cfg.data_dir)
    by_cat: dict[str, list[str]] = {}
    for p in rows:
        if p.category is not None and p.category in categories:
            by_cat.setdefault(p.category, []).append(p.text)
    return {c: texts[cfg.category_offset : cfg.category_offset + cfg.category_n] for c, texts in by_cat.items()}


def run_eval(cfg: EvalConfig, backend=None, progress: Callable[[str], None] | None = None) -> dict:
    """Run the evaluation; returns the result dict (also written to ``cfg.out / "result.json"``)."""
    from vllm_steer.evaluation.judges import make_judge

    say = progress or (lambda _msg: None)
    profiles = load_profile_dir(cfg.profiles)
    unknown = [t.profile_id for t in cfg.targets if t.profile_id not in profiles]
    if unknown:
        raise EvalError("profile", f"unknown {unknown} (in {cfg.profiles}: {sorted(profiles)})")
    judges = [make_judge(spec, cfg.judge_api_key_env) for spec in cfg.judges]
    harmful, harmless = _load_sets(cfg)
    over_refusal = _load_over_refusal(cfg)

    gated_ids = [t.profile_id for t in cfg.targets if has_ungated_copy(profiles[t.profile_id])]
    notes: list[str] = []
    served_profiles, scratch = cfg.profiles, None
    ungated: dict[str, Profile] = {}
    if gated_ids and cfg.ungated_comparison:
        if cfg.server or backend is not None:
            notes.append(
                "the ungated comparison was skipped: the engine cannot switch a profile's gate off per request, and "
                "this backend serves its own profiles; serve an ungated copy of "
                + ", ".join(repr(pid) for pid in dict.fromkeys(gated_ids))
                + " (the same profile without its gating block, id '<id>-ungated') and evaluate it with --compare"
            )
        else:
            import tempfile

            scratch = Path(tempfile.mkdtemp(prefix="vllm-steer-eval-profiles-"))
            try:
                ungated = write_eval_profiles(profiles, [t.profile_id for t in cfg.targets], scratch)
            except (ValueError, OSError) as exc:  # a clashing or too long id, a file that cannot be written
                shutil.rmtree(scratch, ignore_errors=True)
                raise EvalError("profile", f"could not write the ungated copies: {exc}") from None
            served_profiles = str(scratch)
            say(f"serving {', '.join(sorted(c.id for c in ungated.values()))} (ungated copies) from {scratch}")
    try:
        return _run(
            cfg, profiles, ungated, served_profiles, notes, judges, harmful, harmless, over_refusal, backend, say
        )
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def _run(
    cfg: EvalConfig,
    profiles: dict[str, Profile],
    ungated: dict[str, Profile],
    served_profiles: str,
    notes: list[str],
    judges: list,
    harmful: list[Prompt],
    harmless: list[Prompt],
    over_refusal: list[Prompt],
    backend,
    say: Callable[[str], None],
) -> dict:
    from vllm_steer.evaluation.judges import JudgeSummary

    points = _points(cfg, profiles, ungated)
    rows: list[Row] = []
    for pi, (profile, value) in enumerate(points):
        extra = _setting(profile, value)
        for group, prompts in (("harmful", harmful), ("harmless", harmless), ("over_refusal", over_refusal)):
            rows += [Row(group, h.text, extra, max_tokens=cfg.max_tokens, meta={"point": pi}) for h in prompts]

    mc_items = []
    if cfg.capability:
        from vllm_steer.evaluation.capability import format_mc_prompt, load_mc_sample

        mc_items = load_mc_sample()[: cfg.capability_n]
        capability_points: list[tuple[Profile | None, float | None]] = [(None, None)]
        for t in cfg.targets:
            for p in (profiles[t.profile_id], ungated.get(t.profile_id)):
                if p is not None:
                    capability_points.append((p, _default_value(p)))
        for ci, (profile, value) in enumerate(capability_points):
            rows += [
                Row(
                    "capability",
                    format_mc_prompt(item),
                    _setting(profile, value),
                    chat=False,
                    max_tokens=1,
                    meta={"point": ci, "item": k},
                )
                for k, item in enumerate(mc_items)
            ]

    category_profiles = [profiles[t.profile_id] for t in cfg.targets if has_categories(profiles[t.profile_id].method)]
    for profile in category_profiles:
        cats = [c for c in profile.spec.categories if c != "generic"]
        vectors = ("generic",) if "generic" in profile.spec.categories else ()
        for cat, texts in _category_prompts(cfg, cats).items():
            for vector in (cat, *vectors):
                extra = _setting(profile, _default_value(profile), [vector])
                rows += [
                    Row(
                        "category",
                        t,
                        extra,
                        max_tokens=cfg.max_tokens,
                        meta={"profile": profile.id, "category": cat, "vector": vector},
                    )
                    for t in texts
                ]

    backend = backend or (
        ServerBackend(cfg.server, cfg.model, _env(cfg.api_key_env))
        if cfg.server
        else OfflineBackend(cfg.model, served_profiles, cfg.eager)
    )
    say(f"generating {len(rows)} rows ({len(points)} settings) in one mixed batch via {backend.name}")
    t0 = time.time()
    gens = backend.generate(rows)
    generate_s = time.time() - t0
    _save_generations(cfg.out, rows, gens)  # kept before any scoring: a long run's generations are never lost
    say("scoring perplexity under the unsteered model")
    free_text = [i for i, r in enumerate(rows) if r.group != "capability"]  # scored and judged alike
    ppl_unsteered = dict(zip(free_text, backend.score_unsteered([gens[i] for i in free_text]), strict=True))
    if callable(getattr(backend, "close", None)):
        backend.close()

    judge_results: dict[str, dict] = {}
    for judge in judges:
        say(f"judging {len(free_text)} responses with {judge.name}")
        verdicts = judge.judge([(rows[i].text, gens[i].text) for i in free_text])
        judge_results[judge.name] = dict(zip(free_text, verdicts, strict=True))

    results: list[PointResult] = []
    for pi, (profile, value) in enumerate(points):
        idx = [i for i, r in enumerate(rows) if r.group in ("harmful", "harmless") and r.meta["point"] == pi]
        hi = [i for i in idx if rows[i].group == "harmful"]
        li = [i for i in idx if rows[i].group == "harmless"]
        texts = [gens[i].text for i in idx]
        refusal_h = _mean([is_refusal(gens[i].text) for i in hi])
        point = PointResult(
            profile=profile.id if profile else None,
            method=profile.method if profile else None,
            value=value,
            n_harmful=len(hi),
            n_harmless=len(li),
            refusal_harmful=refusal_h,
            attack_success=1.0 - refusal_h,
            refusal_harmless=_mean([is_refusal(gens[i].text) for i in li]),
            perplexity_unsteered=_mean([ppl_unsteered[i] for i in idx]),
            perplexity_steered=_mean([perplexity_from_logprobs(gens[i].logprobs) for i in idx]),
            unicode_contamination=1.0 - _mean([unicode_score(t) for t in texts]),
            compression_ratio=_mean([compression_ratio(t) for t in texts]),
            ngram_repetition=_mean([ngram_repetition(t) for t in texts]),
            example_harmful=gens[hi[0]].text[:300] if hi else "",
            example_harmless=gens[li[0]].text[:300] if li else "",
        )
        oi = [i for i, r in enumerate(rows) if r.group == "over_refusal" and r.meta["point"] == pi]
        point.n_over_refusal_set = len(oi)
        point.refusal_over_refusal_set = _mean([is_refusal(gens[i].text) for i in oi])
        for name, by_row in judge_results.items():
            point.judges[name] = {
                "harmful": asdict(JudgeSummary.from_verdicts([by_row[i] for i in hi])),
                "harmless": asdict(JudgeSummary.from_verdicts([by_row[i] for i in li])),
            }
            if oi:
                point.judges[name]["over_refusal"] = asdict(JudgeSummary.from_verdicts([by_row[i] for i in oi]))
        if profile is not None and profile.id in {c.id for c in ungated.values()}:
            point.ungated_of = profile.id.removesuffix(UNGATED_SUFFIX)
        gating = profile.spec.gating if profile is not None else None
        if gating is not None or point.ungated_of is not None:
            gate_rows = []
            for i in [*hi, *li, *oi]:
                decision = gens[i].gate if gating is not None else None
                fired = None if decision is None else decision.get("fired")
                gate_rows.append(
                    GateRow(
                        rows[i].group,
                        gens[i].text,
                        fired,
                        refused_by_gate=gating is not None and gating.action == "refuse" and fired is True,
                        logprobs=gens[i].logprobs,
                        perplexity_unsteered=ppl_unsteered[i],
                    )
                )
            point.gate = gate_summary(
                gate_rows,
                action=gating.action if gating is not None else None,
                gated=gating is not None,
                ungated_of=point.ungated_of,
            )
        results.append(point)

    undecided = sum(p.gate["undecided"] for p in results if p.gate is not None and p.gate["gated"])
    if undecided:
        notes.append(
            f"{undecided} gated rows have no decision (undecided, or none came back"
            + (
                ": a server reports decisions only with vllm-steer's plugin, in non-streaming responses"
                if cfg.server
                else ""
            )
            + "); they are left out of gate precision, recall and flag rates"
        )

    capability = {}
    if mc_items:
        from vllm_steer.evaluation.capability import score_from_logprobs

        for ci, (profile, value) in enumerate(capability_points):
            got = [
                score_from_logprobs(mc_items[r.meta["item"]], gens[i].top)[1]
                for i, r in enumerate(rows)
                if r.group == "capability" and r.meta["point"] == ci
            ]
            key = "unsteered" if profile is None else (profile.id if value is None else f"{profile.id}@{value:g}")
            capability[key] = {"accuracy": _mean(got), "n": len(got)}
            for point in results:
                if point.profile == (profile.id if profile else None) and point.value == value:
                    point.capability_accuracy = _mean(got)

    categories = []
    for profile in category_profiles:
        for cat in sorted(
            {r.meta["category"] for r in rows if r.group == "category" and r.meta["profile"] == profile.id}
        ):
            entry = {"profile": profile.id, "category": cat, "scale": _default_value(profile)}
            for vector in (cat, "generic") if "generic" in profile.spec.categories else (cat,):
                idx = [
                    i
                    for i, r in enumerate(rows)
                    if r.group == "category"
                    and r.meta["profile"] == profile.id
                    and r.meta["category"] == cat
                    and r.meta["vector"] == vector
                ]
                label = "own" if vector == cat else "generic"
                entry[f"refusal_{label}"] = _mean([is_refusal(gens[i].text) for i in idx])
                entry[f"perplexity_{label}"] = _mean([ppl_unsteered[i] for i in idx])
                entry["n"] = len(idx)
            categories.append(entry)

    result = {
        "model": cfg.model,
        "profiles_dir": cfg.profiles,
        "backend": backend.name,
        "served_in_one_mixed_batch": not cfg.server,
        "rows": len(rows),
        "generate_seconds": round(generate_s, 1),
        "data": {
            "harmful": cfg.harmful,
            "harmless": cfg.harmless,
            "n": cfg.n,
            "offset": cfg.offset,
            "max_tokens": cfg.max_tokens,
            "category_data": cfg.category_data,
            "over_refusal": cfg.over_refusal,
            "over_refusal_offset": cfg.over_refusal_offset,
        },
        "notes": notes,
        "perplexity_violation_threshold": PERPLEXITY_VIOLATION,
        "judges": [j.name for j in judges],
        "points": [asdict(p) for p in results],
        "capability": capability,
        "categories": categories,
    }
    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "result.json").write_text(json.dumps(_finite(result), indent=1))
    return result


def _save_generations(out: Path, rows: Sequence[Row], gens: Sequence[Generation]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "generations.jsonl", "w") as fh:
        for row, gen in zip(rows, gens, strict=True):
            fh.write(
                json.dumps(
                    {
                        "group": row.group,
                        "prompt": row.text,
                        "steering": row.extra_args,
                        "meta": row.meta,
                        "text": gen.text,
                        "tokens": len(gen.token_ids),
                        "gate": gen.gate,
                    }
                )
                + "\n"
            )


def _finite(value: Any) -> Any:
    """NaN/inf become ``null``: the result file stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _env(name: str | None) -> str | None:
    import os

    return os.environ.get(name) if name else None
