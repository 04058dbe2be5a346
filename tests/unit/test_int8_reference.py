"""The int8 W8A8 stand-in the quantized engine test's HF reference uses (vllm_steer.testing.int8): vLLM's CPU
integer arithmetic, with oneDNN's 16-bit pair saturation on CPUs without VNNI."""

from __future__ import annotations

import json

import pytest
import torch

from vllm_steer.testing.int8 import _int8_linear, _quantize_tokens, emulate_w8a8, int8_saturates


def test_int8_saturates_reads_the_cpu_flags():
    assert int8_saturates("processor : 0\nflags : fpu sse2 avx2 fma\n")
    assert int8_saturates("flags : fpu avx512f avx512bw\n"), "AVX-512 without VNNI saturates too"
    for wide in ("avx512_vnni", "avx_vnni", "amx_int8"):
        assert not int8_saturates(f"flags : fpu avx2 {wide}\n"), wide


@pytest.mark.parametrize("symmetric", [True, False])
def test_without_saturation_it_is_the_dequantized_product(symmetric):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 33, generator=gen)  # an odd K: padded with a zero pair member
    w = torch.randint(-127, 128, (7, 33), generator=gen, dtype=torch.int8)
    s = torch.rand(7, 1, generator=gen) / 100
    q, scale, zero_point = _quantize_tokens(x, symmetric)
    assert int(q.min()) >= -128 and int(q.max()) <= 127
    assert torch.allclose(scale * (q - zero_point), x, atol=float(scale.max()))  # within one step
    want = (scale.double() * (q - zero_point).double()) @ (w.double() * s.double()).T
    got = _int8_linear(w, s, symmetric, saturate=False)(x)
    assert torch.allclose(got.double(), want, rtol=1e-6, atol=1e-9)


def test_saturation_clips_each_pair_of_products_to_16_bits():
    w = torch.tensor([[127, 127, 1, 1]], dtype=torch.int8)
    s = torch.ones(1, 1)
    x = torch.tensor([[1.0, 1.0, 0.0, -1.0]])  # asymmetric: 1.0 → 127, shifted to u8 255
    q, scale, zero_point = _quantize_tokens(x, symmetric=False)
    u = (q + 128)[0].tolist()
    pair = (u[0] + u[1]) * 127
    assert u[0] >= 250 and u[1] >= 250 and pair > 32767, u
    exact = _int8_linear(w, s, False, saturate=False)(x)
    clipped = _int8_linear(w, s, False, saturate=True)(x)
    dot = 32767 + u[2] + u[3] - (128 + int(zero_point)) * (127 + 127 + 1 + 1)
    assert float(clipped) == pytest.approx(dot * float(scale), rel=1e-6)
    assert float(exact) == pytest.approx(float(x @ w.float().T), abs=2.0), "x·w = 253, within quantization"
    assert float(clipped) < float(exact) - 100.0, "the clipped pair loses 32003 steps"


def test_emulate_w8a8_replaces_every_quantized_linear_and_refuses_other_schemes(tmp_path):
    from transformers import AutoModelForCausalLM

    from vllm_steer.testing.tiny import build_tiny_quantized

    root = build_tiny_quantized(tmp_path / "tiny")
    model = AutoModelForCausalLM.from_pretrained(root / "model", dtype=torch.float32).eval()
    assert emulate_w8a8(model, root / "model", saturate=False) == 7 * model.config.num_hidden_layers
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()
    config = json.loads((root / "model" / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["input_activations"]["dynamic"] = False
    (root / "model" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="dynamic per-token int8 activations"):
        emulate_w8a8(model, root / "model")
