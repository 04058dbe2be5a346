"""Profile format v1: round trips, and every refusal names the file and the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vllm_steer.core.profile import (
    PROFILE_FILE,
    TENSORS_FILE,
    ModelFingerprint,
    Profile,
    ProfileError,
    ProfileSpec,
    load_profile,
    load_profile_dir,
    profile_changes,
    save_profile,
)
from vllm_steer.testing.synthetic import random_profile

FP = ModelFingerprint(architecture="LlamaForCausalLM", hidden_size=16, num_layers=4)
METHODS = ["addition", "probe", "category", "ablation", "angular_standard", "angular_adaptive", "selective"]


def _write(tmp_path: Path, pid: str, method: str, layers=(1, 2), **kw) -> Path:
    profile = random_profile(pid, method, FP, list(layers), **kw)
    return save_profile(tmp_path / pid, profile.spec, profile.vectors)


def _edit_json(directory: Path, edit) -> None:
    path = directory / PROFILE_FILE
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))


def _edit_tensors(directory: Path, edit) -> None:
    path = directory / TENSORS_FILE
    stored = dict(load_file(str(path)))
    edit(stored)
    save_file({k: v.contiguous() for k, v in stored.items()}, str(path))


def _refused(directory: Path, file: str, field: str, *, expected_model=None, exact_field: bool = True) -> ProfileError:
    with pytest.raises(ProfileError) as info:
        load_profile(directory, expected_model)
    err = info.value
    msg = str(err)
    assert file in msg, msg
    assert Path(err.path).name == file
    assert field in msg, msg
    if exact_field:
        assert err.field == field, msg
    return err


# ----------------------------------------------------------------- round trips


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shared_plane", [True, False])
def test_round_trip(tmp_path, method, shared_plane):
    profile = random_profile(f"rt-{method}", method, FP, [0, 2, 3], seed=5, shared_plane=shared_plane)
    directory = save_profile(tmp_path / "p", profile.spec, profile.vectors)
    loaded = load_profile(directory, expected_model=FP)
    assert isinstance(loaded, Profile)
    assert loaded.spec == profile.spec
    assert loaded.id == profile.id and loaded.method == method
    assert loaded.digest == profile.digest
    assert set(loaded.vectors) == {0, 2, 3}
    for layer, roles in profile.vectors.items():
        assert set(loaded.vectors[layer]) == set(roles)
        for role, tensor in roles.items():
            got = loaded.vectors[layer][role]
            assert got.dtype == torch.float32 and torch.equal(got, tensor)
    stored = load_file(str(directory / TENSORS_FILE))
    if method in ("angular_standard", "angular_adaptive", "selective") and shared_plane:
        assert sorted(stored) == ["b1", "b2"]  # one plane shared by all layers is stored once
    assert len(stored) == len({n for roles in profile.spec.tensors.values() for n in roles.values()})


def test_round_trip_directory(tmp_path):
    for i, method in enumerate(METHODS):
        _write(tmp_path, f"p-{method.replace('_', '-')}", method, seed=i)
    (tmp_path / "not-a-profile").mkdir()  # sub-directories without profile.json are skipped
    profiles = load_profile_dir(tmp_path, expected_model=FP)
    assert sorted(profiles) == sorted(f"p-{m.replace('_', '-')}" for m in METHODS)
    assert {p.method for p in profiles.values()} == set(METHODS)


def test_profile_changes_names_added_removed_and_replaced_by_digest():
    keep, old_b, new_b = (
        random_profile(pid, "selective", FP, [1], seed=seed) for pid, seed in (("a", 1), ("b", 2), ("b", 3))
    )
    gone, fresh = random_profile("c", "addition", FP, [1], seed=4), random_profile("d", "addition", FP, [1], seed=5)
    changes = profile_changes({"a": keep, "b": old_b, "c": gone}, {"a": keep, "b": new_b, "d": fresh})
    assert changes == {"added": ["d"], "removed": ["c"], "replaced": ["b"], "profiles": ["a", "b", "d"]}
    assert profile_changes({"a": keep}, {"a": keep})["replaced"] == []


def test_digest_depends_on_content():
    a = random_profile("x", "selective", FP, [1], seed=1)
    b = random_profile("x", "selective", FP, [1], seed=2)
    a2 = random_profile("x", "selective", FP, [1], seed=1)
    assert a.digest == a2.digest
    assert a.digest != b.digest
    c = random_profile("x", "selective", FP, [1], seed=1, angle=45.0)
    assert c.digest != a.digest


def test_save_profile_refuses_reused_name_for_different_tensors(tmp_path):
    profile = random_profile("p", "addition", FP, [1, 2])
    tensors = {1: {"vector": "same"}, 2: {"vector": "same"}}
    spec = ProfileSpec.model_validate({**profile.spec.model_dump(), "tensors": tensors})
    with pytest.raises(ProfileError) as info:
        save_profile(tmp_path / "p", spec, profile.vectors)
    assert TENSORS_FILE in str(info.value) and "tensors.2.vector" in str(info.value)


def test_save_profile_checks_the_tensors(tmp_path):
    profile = random_profile("p", "probe", FP, [1])
    bad = {1: {"vector": profile.vectors[1]["vector"] * 2}}
    with pytest.raises(ProfileError) as info:
        save_profile(tmp_path / "p", profile.spec, bad)
    assert "tensors.1.vector" in str(info.value)


# ----------------------------------------------------------------- profile.json refusals


def test_unknown_extra_field(tmp_path):
    d = _write(tmp_path, "p", "selective")
    _edit_json(d, lambda raw: raw.update(colour="blue"))
    _refused(d, PROFILE_FILE, "colour")


def test_unknown_nested_field(tmp_path):
    d = _write(tmp_path, "p", "selective")
    _edit_json(d, lambda raw: raw["defaults"].update(angel=3.0))
    _refused(d, PROFILE_FILE, "defaults.angel")


@pytest.mark.parametrize("field", ["method", "id", "model", "layers", "tensors", "format_version"])
def test_missing_field(tmp_path, field):
    d = _write(tmp_path, "p", "selective")
    _edit_json(d, lambda raw: raw.pop(field))
    _refused(d, PROFILE_FILE, field)


def test_missing_nested_field(tmp_path):
    d = _write(tmp_path, "p", "selective")
    _edit_json(d, lambda raw: raw["model"].pop("hidden_size"))
    _refused(d, PROFILE_FILE, "model.hidden_size")


@pytest.mark.parametrize(
    "field,value",
    [("format_version", 2), ("method", "steer_harder"), ("id", "Has Spaces"), ("threshold", "high"), ("layers", [])],
)
def test_bad_values(tmp_path, field, value):
    d = _write(tmp_path, "p", "angular_adaptive")
    _edit_json(d, lambda raw: raw.update({field: value}))
    _refused(d, PROFILE_FILE, field)


def test_layers_beyond_num_layers(tmp_path):
    d = _write(tmp_path, "p", "selective")

    def edit(raw):
        raw["layers"] = [1, 2, 7]
        raw["tensors"]["7"] = {"b1": "b1", "b2": "b2"}

    _edit_json(d, edit)
    err = _refused(d, PROFILE_FILE, "layers")
    assert "[7]" in str(err)


def test_negative_and_repeated_layers(tmp_path):
    d = _write(tmp_path, "p", "selective")
    _edit_json(d, lambda raw: raw.update(layers=[1, 1, 2]))
    _refused(d, PROFILE_FILE, "layers")
    d2 = _write(tmp_path, "q", "selective")
    _edit_json(d2, lambda raw: raw.update(layers=[-1, 1, 2]))
    _refused(d2, PROFILE_FILE, "layers")


def test_tensors_layers_mismatch(tmp_path):
    d = _write(tmp_path, "p", "selective")
    _edit_json(d, lambda raw: raw["tensors"].pop("2"))
    _refused(d, PROFILE_FILE, "tensors")


def test_tensor_roles_wrong_for_method(tmp_path):
    d = _write(tmp_path, "p", "selective")
    _edit_json(d, lambda raw: raw["tensors"].update({"2": {"vector": "b1"}}))
    _refused(d, PROFILE_FILE, "tensors.2")


def test_fingerprint_mismatch(tmp_path):
    d = _write(tmp_path, "p", "selective")
    for other, key in (
        (FP.model_copy(update={"hidden_size": 32}), "hidden_size"),
        (FP.model_copy(update={"num_layers": 8}), "num_layers"),
        (FP.model_copy(update={"architecture": "Qwen2ForCausalLM"}), "architecture"),
    ):
        err = _refused(d, PROFILE_FILE, "model", expected_model=other)
        assert key in str(err)
    # The name is informational; it does not have to match.
    load_profile(d, expected_model=FP.model_copy(update={"name": "something-else"}))


def test_defaults_outside_allowed_range(tmp_path):
    d = _write(tmp_path, "p", "selective")
    _edit_json(d, lambda raw: raw["defaults"].update(angle=400.0))
    _refused(d, PROFILE_FILE, "defaults.angle")
    d2 = _write(tmp_path, "q", "addition")
    _edit_json(d2, lambda raw: raw["defaults"].update(scale=-100.0))
    _refused(d2, PROFILE_FILE, "defaults.scale")


def test_allowed_range_min_above_max(tmp_path):
    d = _write(tmp_path, "p", "selective")
    _edit_json(d, lambda raw: raw["allowed"].update(angle={"min": 10.0, "max": 5.0}))
    _refused(d, PROFILE_FILE, "allowed.angle")


def test_default_required_for_method(tmp_path):
    d = _write(tmp_path, "p", "selective")
    _edit_json(d, lambda raw: raw["defaults"].update(angle=None))
    _refused(d, PROFILE_FILE, "defaults.angle")


def test_categories_only_for_category_profiles(tmp_path):
    d = _write(tmp_path, "p", "addition")
    _edit_json(d, lambda raw: raw.update(categories=["x"]))
    _refused(d, PROFILE_FILE, "categories")
    d2 = _write(tmp_path, "q", "category")
    _edit_json(d2, lambda raw: raw.update(categories=["cat_a", "cat_a", "cat_b"]))
    _refused(d2, PROFILE_FILE, "categories")


def test_invalid_json_and_missing_files(tmp_path):
    d = _write(tmp_path, "p", "selective")
    (d / PROFILE_FILE).write_text("{not json")
    _refused(d, PROFILE_FILE, "<json>")
    empty = tmp_path / "empty"
    empty.mkdir()
    _refused(empty, PROFILE_FILE, "<file>")
    d2 = _write(tmp_path, "q", "selective")
    (d2 / TENSORS_FILE).unlink()
    _refused(d2, TENSORS_FILE, "<file>")


# ----------------------------------------------------------------- tensors.safetensors refusals


def test_wrong_hidden_width(tmp_path):
    d = _write(tmp_path, "p", "addition")
    _edit_tensors(d, lambda t: t.update({"vector.2": torch.randn(17)}))
    err = _refused(d, TENSORS_FILE, "tensors.2.vector")
    assert "hidden_size" in str(err)


def test_wrong_rank(tmp_path):
    d = _write(tmp_path, "p", "addition")
    _edit_tensors(d, lambda t: t.update({"vector.1": torch.randn(1, 16)}))
    _refused(d, TENSORS_FILE, "tensors.1.vector")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_tensor(tmp_path, bad):
    d = _write(tmp_path, "p", "addition")

    def edit(t):
        v = t["vector.1"].clone()
        v[3] = bad
        t["vector.1"] = v

    _edit_tensors(d, edit)
    _refused(d, TENSORS_FILE, "tensors.1.vector")


def test_nan_in_plane(tmp_path):
    d = _write(tmp_path, "p", "selective")

    def edit(t):
        v = t["b2"].clone()
        v[0] = float("nan")
        t["b2"] = v

    _edit_tensors(d, edit)
    _refused(d, TENSORS_FILE, "tensors.1.b2")


def test_zero_vector(tmp_path):
    d = _write(tmp_path, "p", "ablation")
    _edit_tensors(d, lambda t: t.update({"vector.2": torch.zeros(16)}))
    _refused(d, TENSORS_FILE, "tensors.2.vector")


def test_tensor_missing_from_file(tmp_path):
    d = _write(tmp_path, "p", "addition")
    _edit_tensors(d, lambda t: t.pop("vector.2"))
    _refused(d, TENSORS_FILE, "tensors.2.vector")


def test_non_orthonormal_plane(tmp_path):
    d = _write(tmp_path, "p", "selective")

    def tilt(t):
        b2 = t["b2"] + 0.2 * t["b1"]
        t["b2"] = b2 / b2.norm()  # unit, but not orthogonal to b1

    _edit_tensors(d, tilt)
    _refused(d, TENSORS_FILE, "tensors.1.b2")

    d2 = _write(tmp_path, "q", "angular_standard")
    _edit_tensors(d2, lambda t: t.update(b1=t["b1"] * 1.5))
    _refused(d2, TENSORS_FILE, "tensors.1.b1")


def test_non_unit_probe(tmp_path):
    d = _write(tmp_path, "p", "probe")
    _edit_tensors(d, lambda t: t.update({"vector.2": t["vector.2"] * 1.1}))
    _refused(d, TENSORS_FILE, "tensors.2.vector")
    # An addition vector's length is its gain: no unit requirement there.
    d2 = _write(tmp_path, "q", "addition")
    _edit_tensors(d2, lambda t: t.update({"vector.2": t["vector.2"] * 1.1}))
    load_profile(d2)


@pytest.mark.parametrize("content", [b"", b"garbage bytes, not safetensors", b"\xff" * 64])
def test_corrupt_safetensors(tmp_path, content):
    d = _write(tmp_path, "p", "selective")
    (d / TENSORS_FILE).write_bytes(content)
    _refused(d, TENSORS_FILE, "<file>")


def test_truncated_safetensors(tmp_path):
    d = _write(tmp_path, "p", "selective")
    data = (d / TENSORS_FILE).read_bytes()
    (d / TENSORS_FILE).write_bytes(data[: len(data) - 10])
    _refused(d, TENSORS_FILE, "<file>")


# ----------------------------------------------------------------- profile directories


def test_duplicate_ids_in_directory(tmp_path):
    root = tmp_path / "profiles"
    a = random_profile("same-id", "selective", FP, [1], seed=1)
    b = random_profile("same-id", "addition", FP, [2], seed=2)
    save_profile(root / "a", a.spec, a.vectors)
    save_profile(root / "b", b.spec, b.vectors)
    with pytest.raises(ProfileError) as info:
        load_profile_dir(root)
    err = info.value
    assert err.field == "id"
    assert PROFILE_FILE in str(err) and "same-id" in str(err)
    assert str(root / "b") in str(err) and str(root / "a") in str(err)


def test_symlink_outside_root_is_refused(tmp_path):
    root = tmp_path / "profiles"
    outside = tmp_path / "elsewhere"
    _write(root, "inside", "selective")
    _write(outside, "sneaky", "addition")
    (root / "link").symlink_to(outside / "sneaky", target_is_directory=True)
    with pytest.raises(ProfileError) as info:
        load_profile_dir(root)
    assert str(root / "link") in str(info.value)
    assert "symlink" in str(info.value)


def test_symlink_inside_root_is_allowed(tmp_path):
    root = tmp_path / "profiles"
    _write(root / "store", "real", "selective")  # root/store has no profile.json itself
    (root / "alias").symlink_to(root / "store" / "real", target_is_directory=True)
    profiles = load_profile_dir(root)
    assert list(profiles) == ["real"]


def test_profile_dir_missing(tmp_path):
    with pytest.raises(ProfileError) as info:
        load_profile_dir(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(info.value)


def test_profile_dir_propagates_fingerprint_check(tmp_path):
    _write(tmp_path, "p", "selective")
    with pytest.raises(ProfileError) as info:
        load_profile_dir(tmp_path, expected_model=FP.model_copy(update={"num_layers": 2}))
    assert info.value.field == "model" and PROFILE_FILE in str(info.value)


def test_save_refusing_bad_tensors_leaves_nothing_behind(tmp_path):
    profile = random_profile("p", "selective", FP, [1, 2], seed=0)
    bad = {layer: {"b1": roles["b1"] * float("nan"), "b2": roles["b2"]} for layer, roles in profile.vectors.items()}
    with pytest.raises(ProfileError, match="NaN"):
        save_profile(tmp_path / "p", profile.spec, bad)
    assert list(tmp_path.iterdir()) == [], "a refused profile must not be left on disk"


def test_save_replaces_an_existing_profile_atomically(tmp_path):
    first = random_profile("p", "selective", FP, [1, 2], seed=0)
    second = random_profile("p", "selective", FP, [1, 2], seed=1)
    save_profile(tmp_path / "p", first.spec, first.vectors)
    save_profile(tmp_path / "p", second.spec, second.vectors)
    assert load_profile(tmp_path / "p").digest == second.digest
    assert [p.name for p in tmp_path.iterdir()] == ["p"]


def test_symlinked_file_escaping_the_root_is_refused(tmp_path):
    outside = _write(tmp_path / "outside", "evil", "selective")
    root = tmp_path / "root"
    inside = _write(root, "p", "selective")
    (inside / TENSORS_FILE).unlink()
    (inside / TENSORS_FILE).symlink_to(outside / TENSORS_FILE)
    with pytest.raises(ProfileError, match="outside the profile directory") as info:
        load_profile_dir(root)
    assert TENSORS_FILE in str(info.value)
