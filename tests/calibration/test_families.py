"""Calibration and import on every family of the layout table (issue 18), on the tiny models (HF only).

``vllm-steer calibrate`` reads activations through the layout table's HF tree, so each family must give a
loadable profile for its own architecture; a llama.cpp control vector's ``direction.N`` must land at the
output of decoder layer N whatever the family's module names.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from support import DATA
from support.gguf import block_inputs_with_and_without, write_gguf
from vllm_steer.calibration.interop import model_fingerprint, profile_from_vectors, read_gguf_control_vector
from vllm_steer.calibration.pipeline import CalibrationConfig, calibrate_profile
from vllm_steer.core.profile import Profile, load_profile
from vllm_steer.testing.tiny import TINY_FAMILIES, build_tiny

FAMILY_MODELS = [name for name in TINY_FAMILIES if name != "llama"]
LLAMA_CPP_HINT = {"mistral": "llama", "mixtral": "llama", "qwen3_moe": "qwen3moe", "gemma3": "gemma3"}


@pytest.fixture(scope="module", params=FAMILY_MODELS)
def family_root(request, tmp_path_factory):
    return request.param, build_tiny(tmp_path_factory.mktemp(f"tiny-{request.param}"), request.param)


def test_calibrate_gives_a_loadable_profile_for_the_familys_architecture(family_root, tmp_path):
    family, root = family_root
    cfg = CalibrationConfig(
        model=str(root / "model"),
        method="selective",
        out=tmp_path / "profile",
        harmful=str(DATA / "harmful.csv"),
        harmless=str(DATA / "harmless.jsonl"),
        n=6,
        held_out=0.2,
        seed=0,
        batch_size=3,
        layers=[1, 2],
    )
    path = calibrate_profile(cfg)
    profile = load_profile(path)
    fingerprint = model_fingerprint(root / "model")
    assert profile.spec.model == fingerprint, family  # shape and identity, computed the same way
    assert fingerprint.tokenizer_sha256 and fingerprint.embedding_sha256
    load_profile(path, fingerprint, strict=True)  # the checkpoint it was made on passes strict matching
    b1, b2 = profile.vectors[1]["b1"], profile.vectors[1]["b2"]
    assert abs(float(b1 @ b2)) < 1e-4 and torch.isfinite(b1).all()


def test_a_gguf_direction_n_is_added_at_the_output_of_decoder_layer_n(family_root, tmp_path):
    from transformers import AutoModelForCausalLM

    family, root = family_root
    fingerprint = model_fingerprint(root / "model")
    v = np.random.default_rng(7).standard_normal(fingerprint.hidden_size).astype(np.float32)
    hint = LLAMA_CPP_HINT.get(family, family)
    source = read_gguf_control_vector(write_gguf(tmp_path / "cv.gguf", {"direction.1": v}, hint=hint), fingerprint)
    spec, vectors = profile_from_vectors(source, fingerprint, "cv", "addition", scale=1.0)
    profile = Profile(spec, vectors)
    kwargs = {"attn_implementation": "eager"} if family.startswith("gemma") else {}
    model = AutoModelForCausalLM.from_pretrained(root / "model", dtype=torch.float32, **kwargs).eval()
    base, seen = block_inputs_with_and_without(model, profile)
    torch.testing.assert_close(seen[1], base[1], rtol=0, atol=0)
    torch.testing.assert_close(seen[2] - base[2], torch.from_numpy(v).expand_as(base[2]), rtol=1e-4, atol=1e-4)


def test_import_then_export_round_trips_through_the_cli(family_root, tmp_path):
    """`vllm-steer import` (a llama.cpp control vector for this family) then `export` give the same vectors, and
    the exported file names the family so llama.cpp and a re-import accept it."""
    from typer.testing import CliRunner

    from vllm_steer.cli import app

    family, root = family_root
    fingerprint = model_fingerprint(root / "model")
    rng = np.random.default_rng(3)
    vectors = {f"direction.{n}": rng.standard_normal(fingerprint.hidden_size).astype(np.float32) for n in (1, 2)}
    source = write_gguf(tmp_path / "cv.gguf", vectors, hint=LLAMA_CPP_HINT.get(family, family))
    out = tmp_path / "profiles" / "cv"
    runner = CliRunner()
    imported = runner.invoke(app, ["import", str(root / "model"), str(source), "--out", str(out), "--id", "cv"])
    assert imported.exit_code == 0, imported.output
    assert load_profile(out, fingerprint, strict=True).spec.model == fingerprint  # identity recorded
    exported = runner.invoke(app, ["export", str(out), "--out", str(tmp_path / "back.gguf"), "--scale", "1"])
    assert exported.exit_code == 0, exported.output
    back = read_gguf_control_vector(tmp_path / "back.gguf", fingerprint)  # the model hint is checked
    for name, v in vectors.items():
        layer = int(name.split(".")[1])
        np.testing.assert_allclose(back.vectors[layer].numpy(), v, rtol=1e-6, atol=1e-6)
