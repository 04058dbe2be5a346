"""The mixed batch the engine tests run (tests/engine/test_engine.py), and the server tests compare against.

Several prompts, each with unsteered rows and rows of every method (profiles of the tiny model,
vllm_steer.testing.tiny), in one ``generate`` call; then the long prompt again with new steering and
unsteered, for prefix caching. :func:`run_mixed_batch` runs it in one engine configuration.
"""

from __future__ import annotations

import os
from pathlib import Path

from vllm_steer.testing.engines import run_engine

PROMPTS = [
    "The capital of France is",
    (
        "Write a short poem about the sea and the wind, in the style of an old sailor who has seen many storms "
        "and many calm nights, and who now tells the young crew what he has learned about patience and courage. "
        "He speaks of the grey mornings off the northern capes, of ropes frozen stiff, of the cook who sang, "
        "and of the one night the compass failed and the stars alone brought the ship home to harbour."
    ),
    "1 2 3 4 5",
]
SETTINGS = [
    None,
    {"steer_profile": "tiny-addition", "steer_scale": 3.0},
    {"steer_profile": "tiny-addition", "steer_scale": -2.0},
    {"steer_profile": "tiny-probe", "steer_scale": -6.0},
    {"steer_profile": "tiny-category", "steer_categories": ["cat_a", "cat_c"], "steer_scale": 2.0},
    {"steer_profile": "tiny-category", "steer_categories": "cat_b", "steer_scale": 2.0},
    {"steer_profile": "tiny-ablation"},
    {"steer_profile": "tiny-angular-standard", "steer_angle": 45.0},
    {"steer_profile": "tiny-angular-adaptive", "steer_angle": 200.0},
    {"steer_profile": "tiny-selective", "steer_angle": 120.0},
    {"steer_profile": "tiny-selective", "steer_angle": 30.0},
    {"steer_profile": "tiny-selective-b", "steer_angle": 300.0},
    {"steer_profile": "tiny-selective"},  # profile default angle
]
LONG = 1  # index of the long prompt (several KV blocks: prefix caching and chunked prefill matter)
NEW_STEERING = {"steer_profile": "tiny-selective", "steer_angle": 77.0}  # not in SETTINGS: no KV to share
MAX_TOKENS = 12
BAD_REQUESTS = [
    ({"steer_profile": "no-such-profile"}, "steer_profile"),
    ({"steer_profile": "tiny-selective", "steer_angle": float("nan")}, "steer_angle"),
    ({"steer_profile": "tiny-selective", "steer_angle": float("inf")}, "steer_angle"),
    ({"steer_profile": "tiny-selective", "steer_angle": "ninety"}, "steer_angle"),
    ({"steer_profile": "tiny-selective", "steer_angle": 720.0}, "steer_angle"),
    ({"steer_profile": "tiny-addition", "steer_angle": 10.0}, "steer_angle"),
    ({"steer_profile": "tiny-category", "steer_categories": ["nope"]}, "steer_categories"),
    ({"steer_profile": 7}, "steer_profile"),
    ({"steer_angle": 10.0}, "steer_profile"),
    ({"steer_profile": "tiny-selective", "steer_angel": 10.0}, "steer_angel"),
]


def mixed(prompt_ids) -> list[dict]:
    """Phase 0: every prompt with every setting, in one batch."""
    return [
        {"prompt_token_ids": ids, "extra_args": s, "max_tokens": MAX_TOKENS} for ids in prompt_ids for s in SETTINGS
    ]


def mixed_rows(prompt_ids) -> list[tuple[list[int], dict | None]]:
    """(prompt ids, setting) of each row of phase 0, in order."""
    return [(ids, s) for ids in prompt_ids for s in SETTINGS]


def mixed_spec(tiny_root: Path, prompt_ids, *, plugin: bool, eager: bool) -> dict:
    """The engine driver's spec: the mixed batch, then the long prompt with new steering, then unsteered."""
    long_ids = prompt_ids[LONG]
    phases = [
        mixed(prompt_ids),
        # Prefix caching: the long prompt's unsteered blocks are cached by phase 0;
        # new steering on it must recompute, and unsteered must still hit and match.
        [{"prompt_token_ids": long_ids, "extra_args": NEW_STEERING, "max_tokens": MAX_TOKENS}],
        [{"prompt_token_ids": long_ids, "extra_args": None, "max_tokens": MAX_TOKENS}],
    ]
    spec = {
        "model": str(tiny_root / "model"),
        "profiles": str(tiny_root / "profiles") if plugin else None,
        "eager": eager,
        "max_num_batched_tokens": 32,  # forces chunked prefill of the long prompt
        "max_num_seqs": 16,
        "block_size": 32,  # CPU attention needs a multiple of 32
        "enable_prefix_caching": True,
        "phases": phases,
        # Compiled runs enable the plugin by environment only, so the engine config
        # equals the plain run's and only vllm-steer's salt separates the caches.
        "profiles_via_env": not eager,
    }
    if plugin and eager:
        spec["bad_requests"] = [{"prompt_token_ids": prompt_ids[0], "extra_args": bad} for bad, _ in BAD_REQUESTS]
        spec["after_bad"] = [{"prompt_token_ids": prompt_ids[0], "extra_args": SETTINGS[9], "max_tokens": MAX_TOKENS}]
    return spec


def run_mixed_batch(
    tiny_root: Path,
    prompt_ids,
    tmp_path_factory,
    *,
    plugin: bool,
    eager: bool,
    cache_root: Path | None = None,
    env: dict | None = None,
    variant: str = "",
    compile_backend: str | None = None,
) -> dict:
    """Run the mixed batch in one engine configuration (counted as ``mixed-batch:<plugin|plain>-<eager|compiled>``).

    ``compile_backend`` (compiled runs): vLLM's ``compilation_config.backend`` (default Inductor)."""
    name = f"{'plugin' if plugin else 'plain'}-{'eager' if eager else 'compiled'}{variant}"
    env = dict(env or {})
    if cache_root is not None:
        env["VLLM_CACHE_ROOT"] = str(cache_root)
    old = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        spec = mixed_spec(tiny_root, prompt_ids, plugin=plugin, eager=eager)
        if compile_backend is not None:
            spec["compile_backend"] = compile_backend
        return run_engine(spec, tmp_path_factory.mktemp(name), plugin=plugin, key=f"mixed-batch:{name}")
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def hf_reference_for(root: Path, *, eager_attention: bool = False):
    """Greedy tokens and per-token logprobs of the plain HF model in ``root/model`` with hooks applying the
    steering of ``root/profiles``, one request at a time (memoized): ``reference(ids, setting)``; for a gated
    profile also its decision (``fired``) and gate ``scores``.

    ``eager_attention``: HF's eager attention (Gemma 2's attention soft-capping is dropped by ``sdpa``)."""
    import torch
    from transformers import AutoModelForCausalLM

    from vllm_steer.core.profile import load_profile_dir
    from vllm_steer.core.request import parse_steering, resolve_steering
    from vllm_steer.testing.hf_reference import steered
    from vllm_steer.testing.int8 import emulate_w8a8

    kwargs = {"attn_implementation": "eager"} if eager_attention else {}
    model = AutoModelForCausalLM.from_pretrained(root / "model", dtype=torch.float32, **kwargs).eval()
    if getattr(model.config, "quantization_config", None):  # int8 W8A8: vLLM's integer arithmetic, not HF's floats
        emulate_w8a8(model, root / "model")
    profiles = load_profile_dir(root / "profiles")
    cache: dict = {}

    def reference(ids: list[int], setting: dict | None) -> dict:
        key = (tuple(ids), repr(setting))
        if key not in cache:
            request = parse_steering(setting)
            resolved = resolve_steering(request, profiles) if request else None
            profile = profiles[resolved.profile_id] if resolved else None
            with torch.no_grad(), steered(model, profile, resolved) as record:
                out = model.generate(
                    torch.tensor([ids]),
                    max_new_tokens=MAX_TOKENS,
                    min_new_tokens=MAX_TOKENS,
                    do_sample=False,
                    output_logits=True,
                    return_dict_in_generate=True,
                    pad_token_id=0,
                )
            tokens = out.sequences[0, len(ids) :].tolist()
            logprobs = [
                torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(out.logits, tokens, strict=True)
            ]
            # a gated profile's decision on the prompt (None: ungated), and its gates' scores
            fired, scores = (record.fired, record.scores) if record is not None else (None, {})
            category = record.category if record is not None else None  # a routing request's category
            cache[key] = {
                "tokens": tokens,
                "logprobs": logprobs,
                "fired": fired,
                "scores": scores,
                "category": category,
            }
        return cache[key]

    return reference


def assert_every_setting_moves(rows: list[dict], label: object = "") -> None:
    """Not a vacuous proof: every steering setting moves some prompt's row of the mixed batch (its logprobs; a
    weak setting need not flip a token). ``rows`` is phase 0 of a run, in :func:`mixed_rows` order."""
    n = len(SETTINGS)
    for j, setting in enumerate(SETTINGS[1:], start=1):
        moved = max(
            abs(a - b)
            for i in range(len(PROMPTS))
            for a, b in zip(rows[i * n + j]["logprobs"], rows[i * n]["logprobs"], strict=True)
        )
        assert moved > 1e-3, (label, setting, moved)
