"""Tenant tiers for the policy unit tests (test_tenants.py, test_policy_middleware.py): profiles of a
16-wide model, three tenants' keys, the tenants file and the policy built from it."""

from __future__ import annotations

from vllm_steer.core.profile import ModelFingerprint, Profile, ProfileSpec
from vllm_steer.server.tenants import TenantPolicy, hash_api_key
from vllm_steer.testing.synthetic import random_profile

FP = ModelFingerprint(architecture="LlamaForCausalLM", hidden_size=16, num_layers=4)


def narrowed(profile: Profile, **update) -> Profile:
    spec = ProfileSpec.model_validate({**profile.spec.model_dump(), **update})
    return Profile(spec, profile.vectors, source=profile.source)


def _profiles() -> dict[str, Profile]:
    return {
        "refusal": random_profile("refusal", "addition", FP, [1, 2], seed=1, scale=1.0),
        "sel": random_profile("sel", "selective", FP, [1, 2], seed=2, angle=180.0),
        "sel-low": random_profile("sel-low", "selective", FP, [2, 3], seed=3, angle=90.0),
        "ang": random_profile("ang", "angular_standard", FP, [0, 1, 2, 3], seed=4, angle=0.0),
        "cat": random_profile(
            "cat", "category", FP, [1], seed=5, scale=-1.0, categories=("generic", "malware", "fraud")
        ),
        "abl": random_profile("abl", "ablation", FP, [0, 1, 2, 3], seed=6),
        "narrow": narrowed(
            random_profile("narrow", "selective", FP, [1], seed=7, angle=60.0),
            allowed={"angle": {"min": 30.0, "max": 120.0}},
        ),
    }


PROFILES = _profiles()
KEYS = {"acme-strict": "key-strict-0123", "beta-standard": "key-standard-4567", "gamma-research": "key-research-89ab"}


def tenant_entries(keys: dict[str, str]) -> list[dict]:
    """A tenants file's ``tenants`` list: one tenant per ``name -> API key``, its tier the name's second part
    (``acme-strict`` → ``strict``), each key hashed with its own salt."""
    return [
        {"name": name, "tier": name.split("-")[1], "key_hash": hash_api_key(key, salt=bytes([i + 1]) * 16)}
        for i, (name, key) in enumerate(keys.items())
    ]


def tenants_config() -> dict:
    return {
        "format_version": 1,
        "tiers": {
            "strict": {"forced": {"profile": "refusal", "scale": 1.0}},
            "standard": {
                "default": {"profile": "sel", "angle": 180},
                "allow_unsteered": False,
                "profiles": {
                    "sel": {"angle": [150, 210]},
                    "sel-low": {"angle": [150, 210]},
                    "narrow": {"angle": [100, 200]},
                    "cat": {"scale": [-4, 0], "categories": ["generic", "malware"]},
                },
                "max_concurrent_steered": 2,
            },
            "research": {"profiles": "*", "allow_layers_override": True, "allow_unsteered": True},
        },
        "tenants": tenant_entries(KEYS),
    }


POLICY = TenantPolicy.from_mapping(tenants_config())
