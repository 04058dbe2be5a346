"""The method table (vllm_steer.core.methods) is complete and agrees with the op, the profile format and requests."""

from __future__ import annotations

import math
from typing import get_args

import pytest
import torch

from vllm_steer.calibration.interop import EXPORT_METHODS, IMPORT_METHODS
from vllm_steer.calibration.sweep import default_grid, parse_grid
from vllm_steer.core import methods as table
from vllm_steer.core.layout import HOOK_KINDS
from vllm_steer.core.methods import METHODS, MethodName, Setting
from vllm_steer.core.ops import Method, single_method_deltas, token_deltas
from vllm_steer.core.profile import (
    ANGLE_METHODS,
    METHOD_HOOKS,
    SCALE_METHODS,
    ModelFingerprint,
    ProfileError,
    ProfileSpec,
    load_profile,
    save_profile,
)
from vllm_steer.core.request import SteeringRequestError, parse_steering, resolve_steering
from vllm_steer.engine.runtime import every_site, sites_for_profiles
from vllm_steer.testing.hf_reference import reference_op
from vllm_steer.testing.synthetic import random_profile

D = 24
FP = ModelFingerprint(architecture="LlamaForCausalLM", hidden_size=D, num_layers=4)
ALL = list(get_args(MethodName))


def _profile(method: str, seed: int = 0, **kw):
    return random_profile(f"p-{method.replace('_', '-')}", method, FP, [1, 3], seed=seed, **kw)


def test_every_method_name_has_one_entry_and_the_schema_admits_exactly_those():
    assert list(METHODS) == ALL
    assert all(name == entry.name for name, entry in METHODS.items())
    named, nothing = get_args(ProfileSpec.model_fields["method"].annotation)  # MethodName | None (gate-only)
    assert set(get_args(named)) == set(METHODS) and nothing is type(None)


def test_entries_are_well_formed():
    for entry in METHODS.values():
        assert isinstance(entry.op, Method) and entry.op != Method.NONE, entry.name
        assert entry.hooks and set(entry.hooks) <= set(HOOK_KINDS), entry.name
        assert len(set(entry.hooks)) == len(entry.hooks), entry.name
        assert (entry.parameter is None) == (entry.sweep is None) == (entry.parameter_key is None), entry.name
        if entry.roles == "plane":
            assert entry.norm == "orthonormal", entry.name
        assert callable(entry.reference)
    # every hook kind is used by some method, so hooking every site (hot reload) covers them all
    assert {kind for e in METHODS.values() for kind in e.hooks} == set(HOOK_KINDS)


def test_derived_sets_agree_with_the_table():
    assert {"angular_standard", "angular_adaptive", "selective"} == ANGLE_METHODS
    assert {"addition", "probe", "category"} == SCALE_METHODS
    assert dict(METHOD_HOOKS) == {name: e.hooks for name, e in METHODS.items()}
    assert METHOD_HOOKS["ablation"] == ("layer_input", "attn_output", "mlp_output")
    assert METHOD_HOOKS["selective"] == ("input_norm", "post_attn_norm")
    assert METHOD_HOOKS["addition"] == ("layer_output",)
    assert IMPORT_METHODS == ("addition", "probe", "ablation")
    assert EXPORT_METHODS == ("addition", "probe", "category")
    assert {e.op for e in METHODS.values()} == set(Method) - {Method.NONE}, "every op code is some method's"
    with pytest.raises(KeyError, match="unknown method 'steer_harder'"):
        table.method_spec("steer_harder")


@pytest.mark.parametrize("method", ALL)
def test_profile_roles_and_hooks_come_from_the_table(method):
    profile = _profile(method)
    entry = METHODS[method]
    assert profile.spec.hooks == entry.hooks
    assert set(profile.spec.expected_roles()) == set(entry.expected_roles(profile.spec.categories))
    for layer in profile.spec.layers:
        assert set(profile.vectors[layer]) == set(entry.expected_roles(profile.spec.categories))
    wrong = {layer: {"nope": "x"} for layer in profile.spec.layers}
    with pytest.raises(ValueError, match=rf"tensors\.1: has roles \['nope'\], method '{method}' needs"):
        ProfileSpec.model_validate({**profile.spec.model_dump(), "tensors": wrong})


@pytest.mark.parametrize("method", ALL)
def test_the_parameter_is_required_as_a_default_and_the_only_one_a_request_may_set(method):
    profile = _profile(method)
    entry = METHODS[method]
    raw = profile.spec.model_dump()
    if entry.parameter is not None:
        raw["defaults"] = {}
        with pytest.raises(ValueError, match=rf"defaults\.{entry.parameter}: required by method '{method}'"):
            ProfileSpec.model_validate(raw)
    profiles = {profile.id: profile}
    for name in ("angle", "scale"):
        request = parse_steering({"steer_profile": profile.id, f"steer_{name}": 1.0})
        if name == entry.parameter:
            resolved = resolve_steering(request, profiles)
            assert getattr(resolved, name) == 1.0
        else:
            with pytest.raises(SteeringRequestError) as info:
                resolve_steering(request, profiles)
            assert info.value.field == f"steer_{name}" and f"takes no {name}" in str(info.value)
    cats = parse_steering({"steer_profile": profile.id, "steer_categories": "cat_a"})
    if entry.roles == "categories":
        assert resolve_steering(cats, profiles).categories == ("cat_a",)
    else:
        with pytest.raises(SteeringRequestError, match="has no categories"):
            resolve_steering(cats, profiles)


@pytest.mark.parametrize("method", ALL)
def test_length_rules_are_the_ones_the_loader_checks(tmp_path, method):
    """``unit`` and ``orthonormal`` tensors are refused when stretched; ``gain``/``direction`` tensors are not."""
    profile = _profile(method)
    entry = METHODS[method]
    stretched = {layer: {role: 2.5 * t for role, t in roles.items()} for layer, roles in profile.vectors.items()}
    spec = profile.spec
    if entry.norm in ("unit", "orthonormal"):
        save_profile(tmp_path / "ok", spec, profile.vectors)
        directory = tmp_path / "ok"
        from safetensors.torch import save_file

        save_file(
            {
                name: stretched[layer][role].contiguous()
                for layer, roles in spec.tensors.items()
                for role, name in roles.items()
            },
            str(directory / "tensors.safetensors"),
        )
        with pytest.raises(ProfileError, match="unit norm"):
            load_profile(directory)
    else:
        loaded = load_profile(save_profile(tmp_path / "p", spec, stretched))
        layer = spec.layers[0]
        b1, b2, gain = entry.basis(loaded.vectors[layer], tuple(spec.categories[:1]))
        assert float(b1.norm()) == pytest.approx(1.0) and float(b2.norm()) == 0.0
        v = loaded.vectors[layer][entry.expected_roles(spec.categories)[0]]
        assert gain == pytest.approx(float(v.norm()))


def _slot_tables(method: str, tensors, setting: Setting, n: int):
    entry = METHODS[method]
    b1, b2, gain = entry.basis(tensors, setting.categories)
    bases = torch.stack([b1, b2])[None].float()  # one slot
    methods = torch.tensor([int(entry.op)])
    gains = torch.tensor([gain], dtype=torch.float32)
    thresholds = torch.tensor([setting.threshold], dtype=torch.float32)
    t = math.radians(setting.angle)
    token = (
        torch.zeros(n, dtype=torch.int64),
        torch.full((n,), math.cos(t)),
        torch.full((n,), math.sin(t)),
        torch.full((n,), setting.scale),
    )
    return bases, methods, gains, thresholds, token


@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reference_formula_agrees_with_the_batched_op(method, seed):
    """Each entry's formula, op code and basis describe one operator: ``h + token_deltas`` = ``reference(h)``."""
    gen = torch.Generator().manual_seed(100 + seed)
    profile = _profile(method, seed=seed, categories=("cat_a", "cat_b", "cat_c"))
    tensors = profile.vectors[1]
    angle = float(torch.empty(()).uniform_(-360, 360, generator=gen))
    scale = float(torch.empty(()).uniform_(-3, 3, generator=gen))
    threshold = 0.25 if method == "angular_adaptive" else 0.0
    setting = Setting(
        angle=angle,
        scale=scale,
        threshold=threshold,
        categories=("cat_a", "cat_c") if METHODS[method].roles == "categories" else (),
    )
    h = torch.randn(16, D, generator=gen, dtype=torch.float64)
    if METHODS[method].roles == "plane":  # rows on both sides of the adaptive gate
        h[:8] += 2.0 * tensors["b1"].double()
        h[8:] -= 2.0 * tensors["b1"].double()
    bases, methods, gains, thresholds, token = _slot_tables(method, tensors, setting, len(h))
    expected = METHODS[method].reference(h, tensors, setting)
    assert not torch.allclose(expected, h), "the setting must steer"
    got = h + token_deltas(h, bases, methods, gains, thresholds, *token)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    short = h + single_method_deltas(METHODS[method].op, h, bases, gains, thresholds, *token)
    torch.testing.assert_close(short, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ALL)
def test_hf_reference_applies_the_table_formula(method):
    profile = _profile(method)
    request = {"steer_profile": profile.id}
    if METHODS[method].parameter:
        request[f"steer_{METHODS[method].parameter}"] = 2.0 if METHODS[method].parameter == "scale" else 75.0
    resolved = resolve_steering(parse_steering(request), {profile.id: profile})
    h = torch.randn(5, D, dtype=torch.float32)
    setting = Setting(
        angle=resolved.angle, scale=resolved.scale, threshold=profile.spec.threshold, categories=resolved.categories
    )
    torch.testing.assert_close(
        reference_op(profile, resolved, 3)(h), METHODS[method].reference(h, profile.vectors[3], setting)
    )


def test_runtime_sites_are_the_table_hooks():
    profiles = {m: _profile(m) for m in ALL}
    sites = sites_for_profiles(profiles)
    assert {(s.layer, s.kind) for s in sites} == {
        (layer, kind) for m in ALL for layer in (1, 3) for kind in METHODS[m].hooks
    }
    assert {s.kind for s in every_site(2)} == set(HOOK_KINDS)


@pytest.mark.parametrize("method", ALL)
def test_sweep_grids(method):
    entry = METHODS[method]
    if entry.parameter is None:
        with pytest.raises(ValueError, match="no angle or scale to sweep"):
            default_grid(method)
        return
    grid = default_grid(method, "auto")
    assert grid == default_grid(method)
    if entry.parameter == "angle":
        assert grid == [float(a) for a in range(0, 360, 10)]
    elif method == "addition":
        assert grid == [0.25, 0.5, 1.0, 2.0, 4.0]
    else:  # probe and category steer away from harm with negative scales: mirrored
        assert entry.sweep_mirrored
        assert grid == [-4.0, -2.0, -1.0, -0.5, -0.25, 0.25, 0.5, 1.0, 2.0, 4.0]
    custom = default_grid(method, "1,3")
    assert custom == ([-3.0, -1.0, 1.0, 3.0] if entry.sweep_mirrored else parse_grid("1,3"))
