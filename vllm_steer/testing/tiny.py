"""The tiny model the engine tests run: a random 4-layer Llama built locally, and one profile per method.

Small enough that a vLLM engine on two CPU cores starts in about a minute, large enough for chunked
prefill, prefix caching and several KV blocks to matter. Build one by hand with

    python -m vllm_steer.testing.tiny OUT_DIR

which writes ``OUT_DIR/model`` (weights and the default model's tokenizer) and ``OUT_DIR/profiles``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from vllm_steer.core.gates import GateSpec
from vllm_steer.core.gates import margin as gate_margin
from vllm_steer.core.profile import ModelFingerprint, Profile, save_profile
from vllm_steer.testing.synthetic import gate_only_profile, random_profile, with_gates

TINY = ModelFingerprint(architecture="LlamaForCausalLM", hidden_size=128, num_layers=4)

# One profile per method; ablation runs on every layer as in docs/methods.md §3.5.
TINY_PROFILES: dict[str, dict[str, Any]] = {
    "tiny-addition": dict(method="addition", layers=[1, 2]),
    "tiny-probe": dict(method="probe", layers=[2], scale=4.0),
    "tiny-category": dict(method="category", layers=[1, 2]),
    "tiny-ablation": dict(method="ablation", layers=[0, 1, 2, 3]),
    "tiny-angular-standard": dict(method="angular_standard", layers=[1, 2]),
    "tiny-angular-adaptive": dict(method="angular_adaptive", layers=[1, 2]),
    "tiny-selective": dict(method="selective", layers=[1, 2]),
    "tiny-selective-b": dict(method="selective", layers=[2, 3]),
}


# Tiny members of every family in the layout table (vllm_steer.core.layout), for the family tests: the
# conventions of the Llama above (hidden 128, 4 layers, 2 heads of 64, 1 KV head, the default model's
# tokenizer), plus what each family needs to build and to run on vLLM's CPU backend.
_MOE = {"num_experts_per_tok": 2}
TINY_FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {"model_type": "llama"},
    "qwen2": {"model_type": "qwen2", "use_sliding_window": False},
    "qwen3": {"model_type": "qwen3"},
    "mistral": {"model_type": "mistral", "sliding_window": None},
    "phi3": {
        "model_type": "phi3",
        "head_dim": None,  # Phi-3 derives it (hidden / heads = 64)
        "sliding_window": None,
        "resid_pdrop": 0.0,
        "original_max_position_embeddings": 1024,
    },
    "gemma2": {
        "model_type": "gemma2",
        "rms_norm_eps": 1e-6,
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": 64,
        "sliding_window": 16,  # small, so the long prompt crosses it
        "layer_types": ["sliding_attention", "full_attention"] * 2,
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
    },
    "gemma3": {
        "model_type": "gemma3_text",
        "rms_norm_eps": 1e-6,
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": 64,
        "sliding_window": 16,
        "layer_types": ["sliding_attention"] * 3 + ["full_attention"],
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
        },
    },
    "mixtral": {"model_type": "mixtral", "num_local_experts": 4, "sliding_window": None, **_MOE},
    "qwen3_moe": {
        "model_type": "qwen3_moe",
        "num_experts": 4,
        "moe_intermediate_size": 256,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": True,
        **_MOE,
    },
    "olmoe": {
        "model_type": "olmoe",
        "head_dim": None,  # vLLM's OLMoE attention uses hidden / heads
        "tie_word_embeddings": False,  # vLLM never ties OLMoE's output head
        "num_experts": 4,
        "norm_topk_prob": False,
        "clip_qkv": None,
        **_MOE,
    },
    "olmo2": {"model_type": "olmo2", "head_dim": None},  # vLLM 0.32 serves it through its Transformers backend
}
"""Family test name → the HF config of its tiny model (``model_type`` and what differs from the Llama)."""
TINY_REFUSED: dict[str, dict[str, Any]] = {
    "granite": {"model_type": "granite", "head_dim": None},  # vLLM serves it natively; no layout entry
}
"""Tiny models of architectures vllm-steer refuses (the refusal tests start an engine on them)."""


def build_tiny(root: Path, family: str = "llama") -> Path:
    """Write the tiny model of ``family`` (:data:`TINY_FAMILIES`, or :data:`TINY_REFUSED`) to ``root/model`` and one profile per method
    (for its architecture) to ``root/profiles``; return ``root``.

    ``llama``: a random 4-layer Llama (hidden 128, 2 heads, 1 KV head, head_dim 64) with the default model's
    tokenizer; the same seed gives the same weights and profiles. The other families also get random norm
    weights: with the default (uniform) ones, a hook on the wrong side of a norm can act exactly as on the
    right side, and the family tests would not see it."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from vllm_steer.default_model import ensure_default_model

    root = Path(root)
    tokenizer = AutoTokenizer.from_pretrained(ensure_default_model())
    torch.manual_seed(0)
    extra = dict(TINY_FAMILIES.get(family) or TINY_REFUSED[family])
    model_type = extra.pop("model_type")
    common: dict[str, Any] = {
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 64,
        "vocab_size": len(tokenizer),
        "max_position_embeddings": 1024,
        "initializer_range": 0.1,
        "tie_word_embeddings": True,
        "rms_norm_eps": 1e-5,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    settings = {**common, **extra}
    settings = {key: value for key, value in settings.items() if value is not None}
    config = AutoConfig.for_model(model_type, **settings)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).float()
    if family != "llama":
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "norm" in name and name.endswith("weight"):
                    param.add_(0.3 * torch.randn_like(param))
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    fingerprint = ModelFingerprint(
        architecture=config.architectures[0] if config.architectures else type(model).__name__,
        hidden_size=128,
        num_layers=4,
    )
    for seed, (pid, kw) in enumerate(TINY_PROFILES.items()):
        kw = dict(kw)
        profile = random_profile(pid, kw.pop("method"), fingerprint, kw.pop("layers"), seed=seed, vector_norm=8.0, **kw)
        save_profile(root / "profiles" / pid, profile.spec, profile.vectors)
    return root


# Gated profiles of the tiny Llama (docs/methods.md §3.11): steering methods of every kind of hook site under a
# gate, several gates OR-ed, both comparisons and both scores, and a flag-only profile. Each gate is
# (name, layer, score, comparison); the thresholds are set from the prompts the tests send
# (:func:`build_tiny_gated`), so that some of them fire and some do not.
TINY_GATED: dict[str, dict[str, Any]] = {
    "tiny-gated-addition": dict(method="addition", layers=[1, 2], action="steer", gates=[("g", 1, "cast", ">")]),
    "tiny-gated-selective": dict(
        method="selective",
        layers=[1, 2],
        action="steer",
        gates=[("low", 0, "projection", "<"), ("high", 2, "cast", ">")],
    ),
    "tiny-gated-ablation": dict(
        method="ablation", layers=[0, 1, 2, 3], action="steer", gates=[("g", 1, "projection", ">")]
    ),
    "tiny-flag": dict(method="addition", layers=[1, 2], action="flag", gates=[("g", 2, "cast", ">")]),
    "tiny-refuse": dict(
        method="addition",
        layers=[1],
        action="refuse",
        gates=[("g", 1, "projection", ">")],
        refusal="Sorry, I can't help with that.",
    ),
    # A gate-only profile (method null): two gates OR-ed, refusing; nothing that steers.
    "tiny-gate-only": dict(
        method=None,
        layers=[],
        action="refuse",
        gates=[("a", 0, "cast", "<"), ("b", 3, "projection", ">")],
        refusal="Not that, sorry.",
    ),
    # Category routing (``steer_categories: "auto"``): a deciding gate, and one routing gate per category at two
    # layers (both scores), steering after both.
    "tiny-routed": dict(
        method="category",
        layers=[2, 3],
        action="steer",
        gates=[
            ("harm", 1, "projection", ">"),
            ("ga", 1, "cast", ">", "cat_a"),
            ("gb", 1, "projection", ">", "cat_b"),
            ("gc", 2, "projection", ">", "cat_c"),
        ],
    ),
}


def gate_scores_hf(
    model: torch.nn.Module, profile: Profile, prompts: Sequence[Sequence[int]]
) -> list[dict[str, float]]:
    """Each prompt's gate scores (last prompt token) on the HF model, through the HF reference's gate hooks."""
    from vllm_steer.core.request import SteeringRequest, resolve_steering
    from vllm_steer.testing.hf_reference import steered

    resolved = resolve_steering(SteeringRequest(steer_profile=profile.id), {profile.id: profile})
    out = []
    for ids in prompts:
        with torch.no_grad(), steered(model, profile, resolved) as record:
            model(torch.tensor([list(ids)]))
        assert record is not None
        out.append(dict(record.scores))
    return out


def _threshold(
    scores: list[float],
    comparison: str,
    split: tuple[int, int] | None,
    margin: float,
) -> float:
    """A threshold with some prompts on each side and no score within ``margin`` of it: the midpoint of the
    widest gap in the middle half of the sorted scores, or of prompts ``split``'s scores."""
    if split is not None:
        a, b = scores[split[0]], scores[split[1]]
        if abs(a - b) < 2 * margin:
            raise ValueError(f"prompts {split} score {a:.6f} and {b:.6f}: too close to separate")
        return (a + b) / 2
    ordered = sorted(scores)
    n = len(ordered)
    lo, hi = max(1, int(n * 0.25)), max(2, int(n * 0.75))
    gap, i = max((ordered[i] - ordered[i - 1], i) for i in range(lo, hi))
    if gap < 2 * margin:
        raise ValueError(f"no gap of {2 * margin} in the middle of the scores {ordered}")
    return (ordered[i - 1] + ordered[i]) / 2


def _gated(
    pid: str,
    base: Profile | None,
    action: str,
    gates: Sequence[GateSpec],
    directions: dict[str, torch.Tensor],
    refusal: str | None = None,
) -> Profile:
    """``base`` with these gates, or (no base) a gate-only profile of them."""
    if base is None:
        return gate_only_profile(pid, TINY, action, gates, directions, refusal)
    return with_gates(base, action, gates, directions, refusal)


def build_tiny_gated(
    root: Path, prompts: Sequence[Sequence[int]], split: tuple[int, int] | None = None, margin: float = 1e-3
) -> Path:
    """The tiny Llama (:func:`build_tiny`) with only the gated profiles of :data:`TINY_GATED` in ``root/profiles``.

    Each gate's threshold lies in a gap of its scores over ``prompts`` (token ids), at least ``margin`` from
    every score, so the engine and the HF reference decide alike. ``split``: two prompt indices the first
    gate of the first profile must tell apart (the one fires, the other does not)."""
    import shutil

    from transformers import AutoModelForCausalLM

    root = build_tiny(Path(root))
    shutil.rmtree(root / "profiles")
    model = AutoModelForCausalLM.from_pretrained(root / "model", dtype=torch.float32).eval()
    for seed, (pid, kw) in enumerate(TINY_GATED.items(), start=100):
        base = (
            random_profile(pid, kw["method"], TINY, kw["layers"], seed=seed, vector_norm=8.0, scale=3.0)
            if kw["method"] is not None
            else None
        )

        gen = torch.Generator().manual_seed(seed)
        directions = {name: torch.randn(TINY.hidden_size, generator=gen) for name, *_ in kw["gates"]}
        probe = [GateSpec(name=n, layer=layer, tensor=f"gate.{n}", score=sc, threshold=0.0, comparison=cmp,
                          category=rest[0] if rest else None)
                 for n, layer, sc, cmp, *rest in kw["gates"]]  # fmt: skip
        scores = gate_scores_hf(model, _gated(pid, base, "flag", probe, directions), prompts)
        first = seed == 100
        gates = [
            gate.model_copy(
                update={
                    "threshold": _threshold(
                        [s[gate.name] for s in scores],
                        gate.comparison,
                        split if first and j == 0 else None,
                        margin,
                    )
                }
            )
            for j, gate in enumerate(probe)
        ]
        for i, row in enumerate(scores):  # routing: the largest margin must be clear, as the threshold's side is
            margins = sorted(gate_margin(g, row[g.name]) for g in gates if g.category is not None)
            if len(margins) > 1 and margins[-1] - margins[-2] < 2 * margin:
                raise ValueError(f"{pid}: prompt {i}'s two largest routing margins are within {2 * margin}")
        profile = _gated(pid, base, kw["action"], gates, directions, kw.get("refusal"))
        save_profile(root / "profiles" / pid, profile.spec, profile.vectors, profile.gate_vectors)
    return root


def build_tiny_quantized(root: Path, family: str = "llama") -> Path:
    """Write the tiny model of ``family`` (a dense one) as an int8 W8A8 checkpoint to ``root/model``, and
    one profile per method to ``root/profiles`` (as :func:`build_tiny`); return ``root``.

    Every linear layer of the decoder blocks (attention and MLP projections) gets symmetric int8 weights
    with one float32 scale per output channel (``q = round(w / s)`` in [-127, 127], ``s = max|w| / 127``),
    and int8 activations quantized per token at run time, asymmetric — written in the compressed-tensors
    ``int-quantized`` format, as llm-compressor writes it. The embeddings, norms and the (tied) output head
    stay float32. vLLM serves it with its oneDNN int8 GEMM (``CPUInt8ScaledMMLinearKernel``) in float32
    (asymmetric activations keep it off the AMX kernel, which takes bfloat16 activations only);
    ``transformers`` loads the same directory through its compressed-tensors integration (int8 weights
    dequantized to exactly ``q * s``, activations quantized per token in the forward), which is the HF
    reference the engine test compares with.

    Why this scheme (vLLM 0.32 on CPU, float32 engine as the engine tests run): vLLM 0.32 has no GGUF
    loader any more; the GPTQ, AWQ and FP8 configs refuse float32 activations; the int4 CPU kernel
    (compressed-tensors W4A16) has no float32 implementation.
    """
    import json
    import os

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    if family not in TINY_FAMILIES or "num_experts_per_tok" in TINY_FAMILIES[family]:
        raise ValueError(f"build_tiny_quantized takes a dense family, not {family!r}")
    root = build_tiny(Path(root), family)
    model_dir = root / "model"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tensors: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, module in model.model.layers.named_modules(prefix="model.layers"):
            if isinstance(module, torch.nn.Linear):
                if module.bias is not None:
                    raise ValueError(f"{name}: biased linear layers are not quantized by this builder")
                scale = module.weight.abs().amax(dim=1, keepdim=True) / 127.0
                tensors[f"{name}.weight"] = torch.round(module.weight / scale).clamp(-127, 127).to(torch.int8)
                tensors[f"{name}.weight_scale"] = scale.clone()
        for key, value in model.state_dict().items():
            if key not in tensors and not (key == "lm_head.weight" and model.config.tie_word_embeddings):
                tensors[key] = value.clone()
    del model
    for old in model_dir.glob("*.safetensors*"):
        old.unlink()
    tmp = model_dir / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, model_dir / "model.safetensors")
    config = json.loads((model_dir / "config.json").read_text())
    int8 = {"num_bits": 8, "type": "int", "group_size": None, "actorder": None}
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "format": "int-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {**int8, "symmetric": True, "strategy": "channel", "dynamic": False, "observer": "minmax"},
                "input_activations": {
                    **int8,
                    "symmetric": False,
                    "strategy": "token",
                    "dynamic": True,
                    "observer": None,
                },
                "output_activations": None,
                "format": "int-quantized",
            }
        },
        "ignore": ["lm_head"],
        "kv_cache_scheme": None,
    }
    (model_dir / "config.json").write_text(json.dumps(config, indent=2))
    return root


if __name__ == "__main__":
    known = {**TINY_FAMILIES, **TINY_REFUSED}
    if len(sys.argv) not in (2, 3) or (len(sys.argv) == 3 and sys.argv[2] not in known):
        sys.exit(f"usage: python -m vllm_steer.testing.tiny OUT_DIR [{'|'.join(known)}]")
    print(build_tiny(Path(sys.argv[1]), *sys.argv[2:]))
