"""A small model's profiles, one per method, and a mixed set of requests (runtime unit tests, GPU tests)."""

from __future__ import annotations

from vllm_steer.core.profile import ModelFingerprint
from vllm_steer.core.request import parse_steering, resolve_steering
from vllm_steer.engine.runtime import sites_for_profiles
from vllm_steer.testing.synthetic import random_profile

D = 16
FP = ModelFingerprint(architecture="LlamaForCausalLM", hidden_size=D, num_layers=4)

PROFILES = {
    "add": random_profile("add", "addition", FP, [1, 2], seed=1, vector_norm=3.0, scale=1.5),
    "probe": random_profile("probe", "probe", FP, [3], seed=2, scale=2.0),
    "cat": random_profile("cat", "category", FP, [1], seed=3, categories=("fraud", "malware", "violence")),
    "abl": random_profile("abl", "ablation", FP, [0, 1, 2, 3], seed=4),
    "sas": random_profile("sas", "angular_standard", FP, [1, 2], seed=5, angle=120.0),
    "aas": random_profile("aas", "angular_adaptive", FP, [2, 3], seed=6, shared_plane=False),
    "ss": random_profile("ss", "selective", FP, [1, 2], seed=7, shared_plane=False),
    "ss-b": random_profile("ss-b", "selective", FP, [2, 3], seed=8),
}
SITES = sites_for_profiles(PROFILES)


def steer(**kw):
    return resolve_steering(parse_steering({f"steer_{k}": v for k, v in kw.items()}), PROFILES)


MIXED = {
    "r-add": dict(profile="add", scale=-2.5),
    "r-probe": dict(profile="probe", scale=3.0),
    "r-cat": dict(profile="cat", categories=["violence", "fraud"], scale=0.75),
    "r-abl": dict(profile="abl"),
    "r-sas": dict(profile="sas", angle=200.0),
    "r-aas": dict(profile="aas", angle=35.0),
    "r-ss": dict(profile="ss", angle=100.0),
    "r-ss2": dict(profile="ss", angle=300.0),
    "r-ssb": dict(profile="ss-b", angle=60.0),
}
