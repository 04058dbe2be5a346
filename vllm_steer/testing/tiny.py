"""The tiny model the engine tests run: a random 4-layer Llama built locally, and one profile per method.

Small enough that a vLLM engine on two CPU cores starts in about a minute, large enough for chunked
prefill, prefix caching and several KV blocks to matter. Build one by hand with

    python -m vllm_steer.testing.tiny OUT_DIR

which writes ``OUT_DIR/model`` (weights and the default model's tokenizer) and ``OUT_DIR/profiles``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from vllm_steer.core.profile import ModelFingerprint, save_profile
from vllm_steer.testing.synthetic import random_profile

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


def build_tiny(root: Path) -> Path:
    """Write the tiny model to ``root/model`` and its profiles to ``root/profiles``; return ``root``.

    A random 4-layer Llama (hidden 128, 2 heads, 1 KV head, head_dim 64) with the default model's
    tokenizer; the same seed gives the same weights and profiles."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from vllm_steer.default_model import ensure_default_model

    root = Path(root)
    tokenizer = AutoTokenizer.from_pretrained(ensure_default_model())
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        vocab_size=len(tokenizer),
        max_position_embeddings=1024,
        initializer_range=0.1,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config).float()
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    for seed, (pid, kw) in enumerate(TINY_PROFILES.items()):
        kw = dict(kw)
        profile = random_profile(pid, kw.pop("method"), TINY, kw.pop("layers"), seed=seed, vector_norm=8.0, **kw)
        save_profile(root / "profiles" / pid, profile.spec, profile.vectors)
    return root


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m vllm_steer.testing.tiny OUT_DIR")
    print(build_tiny(Path(sys.argv[1])))
