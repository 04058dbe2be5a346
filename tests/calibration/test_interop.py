"""Bring your own vectors: GGUF control vectors, safetensors/NumPy, SAE rows in; GGUF out; the layer convention pinned."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as save_np
from typer.testing import CliRunner

from support.gguf import block_inputs_with_and_without
from support.gguf import write_gguf as _write_gguf
from vllm_steer.calibration.interop import (
    VectorImportError,
    export_gguf,
    export_vectors,
    import_vectors,
    model_fingerprint,
    profile_from_vectors,
    read_gguf_control_vector,
    read_sae_features,
    read_vector_file,
)
from vllm_steer.cli import app
from vllm_steer.core.profile import load_profile
from vllm_steer.testing.synthetic import random_profile
from vllm_steer.testing.tiny import TINY

D, L = TINY.hidden_size, TINY.num_layers


def _vec(seed: int, d: int = D) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(d).astype(np.float32)


def test_gguf_export_then_import_round_trips_exactly(tmp_path):
    profile = random_profile("add", "addition", TINY, [1, 3], seed=3, scale=2.0, vector_norm=5.0)
    path = export_gguf(profile, tmp_path / "cv.gguf", scale=0.5)

    import gguf

    reader = gguf.GGUFReader(str(path))
    assert reader.get_field("general.architecture").contents() == "controlvector"
    assert reader.get_field("controlvector.model_hint").contents() == "llama"
    assert reader.get_field("controlvector.layer_count").contents() == 2
    assert sorted(t.name for t in reader.tensors) == ["direction.1", "direction.3"]

    source = read_gguf_control_vector(path, TINY)
    assert sorted(source.vectors) == [1, 3], "direction.N comes back as layer N"
    for layer in (1, 3):
        torch.testing.assert_close(source.vectors[layer], 0.5 * profile.vectors[layer]["vector"], rtol=0, atol=0)
    out = import_vectors(source, TINY, tmp_path / "back", "back", method="addition", scale=2.0)
    back = load_profile(out, expected_model=TINY)
    assert back.spec.layers == [1, 3] and back.spec.defaults.scale == 2.0
    assert back.spec.calibration["imported_from"]["format"] == "gguf"


def test_direction_n_is_added_to_the_output_of_decoder_layer_n(tiny_root, tmp_path):
    """The off-by-one check: a llama.cpp direction.N is added at the output of decoder layer N."""
    from transformers import AutoModelForCausalLM

    v = _vec(7)
    source = read_gguf_control_vector(_write_gguf(tmp_path / "one.gguf", {"direction.1": v}), TINY)
    spec, vectors = profile_from_vectors(source, TINY, "cv", "addition", scale=1.0)
    from vllm_steer.core.profile import Profile

    profile = Profile(spec, vectors)
    model = AutoModelForCausalLM.from_pretrained(tiny_root / "model", dtype=torch.float32).eval()
    base, seen = block_inputs_with_and_without(model, profile)  # block N's input = block N-1's output
    torch.testing.assert_close(seen[1], base[1], rtol=0, atol=0)  # layer 0's output: untouched
    torch.testing.assert_close(seen[2] - base[2], torch.from_numpy(v).expand_as(base[2]), rtol=1e-5, atol=1e-5)


def test_gguf_import_refuses_what_would_silently_misbehave(tmp_path):
    good = {"direction.1": _vec(1), "direction.2": _vec(2)}
    with pytest.raises(VectorImportError, match=r"direction\.0: layer index 0 is invalid.*--layer-offset -1"):
        read_gguf_control_vector(_write_gguf(tmp_path / "zero.gguf", {"direction.0": _vec(0)}), TINY)
    subset = read_gguf_control_vector(_write_gguf(tmp_path / "two.gguf", good), TINY, layers=[2])
    assert sorted(subset.vectors) == [2]
    with pytest.raises(VectorImportError, match=r"layers: \[3\] have no vector in the file"):
        read_gguf_control_vector(tmp_path / "two.gguf", TINY, layers=[3])
    shifted = read_gguf_control_vector(
        _write_gguf(tmp_path / "hs.gguf", {"direction.1": _vec(1), "direction.4": _vec(4)}), TINY, layer_offset=-1
    )
    assert sorted(shifted.vectors) == [0, 3]
    with pytest.raises(VectorImportError, match=r"direction\.4: maps to layer 4, outside the model's layers 0\.\.3"):
        read_gguf_control_vector(_write_gguf(tmp_path / "deep.gguf", {"direction.4": _vec(4)}), TINY)
    with pytest.raises(VectorImportError, match=r"direction\.1: has width 64, the model's hidden_size is 128"):
        read_gguf_control_vector(_write_gguf(tmp_path / "narrow.gguf", {"direction.1": _vec(1, 64)}), TINY)
    with pytest.raises(VectorImportError, match=r"controlvector\.model_hint: 'qwen2' does not match"):
        read_gguf_control_vector(_write_gguf(tmp_path / "qwen.gguf", good, hint="qwen2"), TINY)
    assert sorted(read_gguf_control_vector(tmp_path / "qwen.gguf", TINY, check_model_hint=False).vectors) == [1, 2]
    with pytest.raises(VectorImportError, match=r"controlvector\.layer_count: says 5 but the file has 2"):
        read_gguf_control_vector(_write_gguf(tmp_path / "count.gguf", good, count=5), TINY)
    with pytest.raises(VectorImportError, match=r"direction\.2: has NaN or inf"):
        read_gguf_control_vector(_write_gguf(tmp_path / "nan.gguf", {"direction.2": np.full(D, np.nan)}), TINY)
    with pytest.raises(VectorImportError, match=r"general\.architecture: is 'llama'"):
        read_gguf_control_vector(
            _write_gguf(tmp_path / "model.gguf", {"token_embd.weight": _vec(1)}, arch="llama"), TINY
        )
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(VectorImportError, match="file: not a readable GGUF"):
        read_gguf_control_vector(tmp_path / "junk.gguf", TINY)


def test_safetensors_and_numpy_layouts(tmp_path):
    named = {"layers.0": _vec(0), "layers.2": _vec(2)}
    save_np(named, str(tmp_path / "named.safetensors"))
    src = read_vector_file(tmp_path / "named.safetensors", TINY)
    assert sorted(src.vectors) == [0, 2]
    np.testing.assert_array_equal(src.vectors[2].numpy(), named["layers.2"])
    assert sorted(read_vector_file(tmp_path / "named.safetensors", TINY, layers=[2]).vectors) == [2]

    matrix = np.stack([_vec(i) for i in range(L)])
    np.save(tmp_path / "matrix.npy", matrix)
    src = read_vector_file(tmp_path / "matrix.npy", TINY)
    assert sorted(src.vectors) == list(range(L)) and src.origin["layout"] == "matrix"
    np.testing.assert_array_equal(src.vectors[3].numpy(), matrix[3])

    np.save(tmp_path / "one.npy", _vec(9))
    assert sorted(read_vector_file(tmp_path / "one.npy", TINY, layers=[1, 3]).vectors) == [1, 3]
    with pytest.raises(VectorImportError, match="layers: a single vector needs --layers"):
        read_vector_file(tmp_path / "one.npy", TINY)
    np.savez(tmp_path / "arrs.npz", **{"direction.1": _vec(1), "bias": _vec(2)})
    with pytest.raises(VectorImportError, match="bias: cannot tell its layer"):
        read_vector_file(tmp_path / "arrs.npz", TINY)
    assert sorted(read_vector_file(tmp_path / "arrs.npz", TINY, key="direction.1").vectors) == [1]
    np.save(tmp_path / "short.npy", np.stack([_vec(i) for i in range(L - 1)]))
    with pytest.raises(VectorImportError, match="has 3 rows, the model has 4 layers"):
        read_vector_file(tmp_path / "short.npy", TINY)
    with pytest.raises(VectorImportError, match="file: not found"):
        read_vector_file(tmp_path / "missing.safetensors", TINY)
    with pytest.raises(VectorImportError, match="unknown extension"):
        read_vector_file(tmp_path / "x.pt", TINY)


def test_sae_rows_become_one_unit_direction(tmp_path):
    w = np.random.default_rng(0).standard_normal((32, D)).astype(np.float32)
    save_np({"W_dec": w}, str(tmp_path / "sae.safetensors"))
    save_np({"W_dec": np.ascontiguousarray(w.T)}, str(tmp_path / "sae_t.safetensors"))
    expected = w[5] / np.linalg.norm(w[5]) + w[9] / np.linalg.norm(w[9])
    expected /= np.linalg.norm(expected)
    for name in ("sae.safetensors", "sae_t.safetensors"):
        src = read_sae_features(tmp_path / name, TINY, [5, 9], layer=2)
        assert list(src.vectors) == [2]
        np.testing.assert_allclose(src.vectors[2].numpy(), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(VectorImportError, match=r"features: \[32\] outside 0\.\.31"):
        read_sae_features(tmp_path / "sae.safetensors", TINY, [32], layer=2)
    with pytest.raises(VectorImportError, match="key: 'decoder' is not in the file"):
        read_sae_features(tmp_path / "sae.safetensors", TINY, [1], layer=2, key="decoder")
    save_np({"W_dec": w[:, :64].copy()}, str(tmp_path / "narrow.safetensors"))
    with pytest.raises(VectorImportError, match=r"W_dec: has shape \(32, 64\), expected \[n_features, 128\]"):
        read_sae_features(tmp_path / "narrow.safetensors", TINY, [1], layer=2)
    spec, vectors = profile_from_vectors(
        read_sae_features(tmp_path / "sae.safetensors", TINY, [5], 2), TINY, "atom", "probe"
    )
    assert spec.method == "probe" and abs(float(vectors[2]["vector"].norm()) - 1) < 1e-6


def test_export_keeps_only_constant_additions():
    cat = random_profile("cat", "category", TINY, [1, 2], categories=("a", "b", "generic"), scale=-2.0)
    summed = export_vectors(cat, categories=["a", "b"])
    torch.testing.assert_close(summed[1], -2.0 * (cat.vectors[1]["a"] + cat.vectors[1]["b"]))
    torch.testing.assert_close(export_vectors(cat)[2], -2.0 * cat.vectors[2]["generic"])
    with pytest.raises(VectorImportError, match=r"categories: unknown \['z'\]"):
        export_vectors(cat, categories=["z"])
    rot = random_profile("rot", "selective", TINY, [1])
    with pytest.raises(VectorImportError, match="method: 'selective' is not a constant addition"):
        export_vectors(rot)
    at_zero = random_profile("z0", "addition", TINY, [0, 1])
    with pytest.raises(VectorImportError, match="layers: layer 0 cannot be expressed"):
        export_gguf(at_zero, "/nonexistent/never-written.gguf")


def test_import_and_export_commands(tiny_root, tmp_path):
    runner = CliRunner()
    model = str(tiny_root / "model")
    fingerprint = model_fingerprint(model)
    assert fingerprint.mismatch(TINY) is None and fingerprint.name == "model"  # TINY's shape
    assert fingerprint.tokenizer_sha256 and fingerprint.embedding_sha256  # and the checkpoint's identity
    gguf_file = _write_gguf(tmp_path / "cv.gguf", {"direction.1": _vec(1), "direction.2": _vec(2)})
    res = runner.invoke(
        app, ["import", model, str(gguf_file), "--id", "cv", "--out", str(tmp_path / "cv"), "--scale", "0.5"]
    )
    assert res.exit_code == 0, res.output
    assert load_profile(tmp_path / "cv").spec.layers == [1, 2]
    res = runner.invoke(app, ["export", str(tmp_path / "cv"), "--out", str(tmp_path / "again.gguf")])
    assert res.exit_code == 0, res.output
    again = read_gguf_control_vector(tmp_path / "again.gguf", TINY)
    np.testing.assert_allclose(again.vectors[2].numpy(), 0.5 * _vec(2), rtol=1e-6)

    bad = _write_gguf(tmp_path / "wide.gguf", {"direction.1": _vec(1, 576)})
    res = runner.invoke(app, ["import", model, str(bad), "--id", "x", "--out", str(tmp_path / "x")])
    assert res.exit_code == 1 and "hidden_size is 128" in res.output and not (tmp_path / "x").exists()
    res = runner.invoke(
        app, ["import", model, str(tmp_path / "cv.gguf"), "--id", "Bad Id!", "--out", str(tmp_path / "y")]
    )
    assert res.exit_code == 1 and "id" in res.output
    res = runner.invoke(
        app, ["export", str(tiny_root / "profiles" / "tiny-selective"), "--out", str(tmp_path / "s.gguf")]
    )
    assert res.exit_code == 1 and "not a constant addition" in res.output
