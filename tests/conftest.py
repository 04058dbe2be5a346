"""Shared fixtures: a tiny random Llama built locally, its profiles, and engine runs shared per configuration.

vLLM engines take 30–100 s to start here, so each engine *configuration* runs
once per session, in its own process (``tests/engine_driver.py``): that keeps
"plugin not loaded" runs truly clean of the plugin, and a crashed engine from
failing one test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vllm_steer.core.profile import ModelFingerprint, save_profile
from vllm_steer.testing.synthetic import random_profile

HERE = Path(__file__).parent
TINY = ModelFingerprint(architecture="LlamaForCausalLM", hidden_size=128, num_layers=4)

# One profile per method; ablation runs on every layer as in docs/methods.md §3.5.
TINY_PROFILES = {
    "tiny-addition": dict(method="addition", layers=[1, 2]),
    "tiny-probe": dict(method="probe", layers=[2], scale=4.0),
    "tiny-category": dict(method="category", layers=[1, 2]),
    "tiny-ablation": dict(method="ablation", layers=[0, 1, 2, 3]),
    "tiny-angular-standard": dict(method="angular_standard", layers=[1, 2]),
    "tiny-angular-adaptive": dict(method="angular_adaptive", layers=[1, 2]),
    "tiny-selective": dict(method="selective", layers=[1, 2]),
    "tiny-selective-b": dict(method="selective", layers=[2, 3]),
}


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    """A random 4-layer Llama (hidden 128, 2 heads, 1 KV head, head_dim 64) with the default model's tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from vllm_steer.default_model import ensure_default_model

    root = tmp_path_factory.mktemp("tiny")
    tokenizer = AutoTokenizer.from_pretrained(ensure_default_model())
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=1, head_dim=64, vocab_size=len(tokenizer), max_position_embeddings=1024,
        initializer_range=0.1, tie_word_embeddings=True, rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config).float()
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    for seed, (pid, kw) in enumerate(TINY_PROFILES.items()):
        kw = dict(kw)
        profile = random_profile(pid, kw.pop("method"), TINY, kw.pop("layers"), seed=seed, vector_norm=8.0, **kw)
        save_profile(root / "profiles" / pid, profile.spec, profile.vectors)
    return root


def run_engine(spec: dict, workdir: Path, *, plugin: bool, timeout: int = 900) -> dict:
    """Run ``engine_driver.py`` on ``spec`` in a fresh process; return its JSON result."""
    workdir.mkdir(parents=True, exist_ok=True)
    spec_path = workdir / "spec.json"
    out_path = workdir / "result.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.pop("VLLM_STEER_PROFILES", None)
    if not plugin:
        env["VLLM_PLUGINS"] = "__no_plugin__"  # an allowlist that matches no plugin: vllm-steer is not loaded
    else:
        env.pop("VLLM_PLUGINS", None)
    log = workdir / "engine.log"
    with open(log, "w") as fh:
        proc = subprocess.run(
            [sys.executable, str(HERE / "engine_driver.py"), str(spec_path), str(out_path)],
            env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout,
        )
    if proc.returncode != 0 or not out_path.exists():
        tail = log.read_text()[-6000:]
        raise AssertionError(f"engine run failed (rc={proc.returncode}); log tail:\n{tail}")
    return json.loads(out_path.read_text())
