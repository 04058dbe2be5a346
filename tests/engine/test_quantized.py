"""Quantized weights (issue 18): the mixed batch on an int8 W8A8 model — steering acts on activations.

The tiny Llama's decoder linears quantized to int8 (per-channel weights, activations per token at run
time, asymmetric; a compressed-tensors checkpoint, vllm_steer.testing.tiny.build_tiny_quantized) and run
by vLLM's oneDNN int8 GEMM in float32. The only quantized path vLLM 0.32 runs on CPU in float32: it has
no GGUF loader; GPTQ/AWQ/FP8 refuse float32; its int4 kernel (W4A16) has no float32 implementation.

The mixed batch runs twice (eager): with the plugin and without. Exact, as for every family: unsteered
rows bit-equal to the plugin-off run, the prefix-cache phases too, every setting moves some row.

Against the HF reference — ``transformers`` loading the same checkpoint, with hooks — the reference must
compute what vLLM's kernel computes. ``transformers`` 5.x (compressed-tensors 0.17) decompresses the weights to
``q · s`` and runs float linear layers, without quantizing activations; and on x86 CPUs without VNNI (the
2-core AVX2 dev and CI boxes) oneDNN's int8 GEMM adds each pair of u8 × s8 products into a saturating 16-bit
integer (``vpmaddubsw``), clipping pairs above 32767: vLLM's own error on such CPUs. A float reference was 0.13
to 0.54 (logprob) off on every row, the unsteered ones too (this test was an expected failure until that was
found). So the reference replaces the quantized linear layers by vLLM's integer arithmetic — activations
rounded half away from zero, pair saturation where this CPU has it (``vllm_steer.testing.int8``; on random
prompts it matches vLLM's tokens and logprobs within 3e-6, asymmetric and symmetric activations alike,
``tests/unit/test_int8_reference.py``). Measured on this batch (39 rows and the prefix-cache row): every row
token-equal; every unsteered row, and 32/40 in all, within 4e-6 of the reference (float rounding: the same
function); 8 steered rows 1.4e-3 to 3.7e-2 apart. Those are rounding boundaries: the plugin's op and the HF
formula differ by ~1e-7 relative, an activation that close to a step of its token's int8 grid rounds the
other way, and one int8 step moves the logprobs by ~1e-2 from there on.

So the bounds: every row within ``ROW_TOLERANCE`` of the reference, compared up to and including its
first diverging token (the two runs still share the context there, so the step compares too); at least
``MIN_TOKEN_EQUAL`` of the rows token-equal; at least ``MIN_TIGHT`` of them, and every unsteered row, within
``TIGHT`` (float rounding: the same function). Steering effects are 0.05 to 0.9 in logprob on this batch, so the row
bound alone would not catch one method gone wrong; per-method correctness is the family tests' (float
models, exact), and steering never touches a linear layer's weights. What this test proves is that
quantized weights change nothing for steering: the plugin hooks the quantized model, leaves unsteered
rows bit-identical, and a missing or misplaced intervention would push the steered rows out of the
float-rounding group.
"""

from __future__ import annotations

import pytest

from support.mixed_batch import (
    LONG,
    NEW_STEERING,
    assert_every_setting_moves,
    hf_reference_for,
    mixed_rows,
    run_mixed_batch,
)
from vllm_steer.testing.tiny import build_tiny_quantized

pytestmark = pytest.mark.engine

ROW_TOLERANCE = 0.1
"""Largest logprob difference of any row from the reference, up to its first diverging token (measured 0.037)."""
TIGHT = 1e-4
"""Float rounding: a row this close to the reference computed the same function (measured 1e-6 to 4e-6)."""
MIN_TOKEN_EQUAL = 0.9
"""Share of rows whose 12 tokens equal the reference's (measured 40/40)."""
MIN_TIGHT = 0.7
"""Share of rows within ``TIGHT`` (measured 32/40; every unsteered row is, and must be)."""


def _deviation(row: dict, ref: dict) -> tuple[bool, float]:
    """Tokens equal, and the largest logprob difference up to and including the first diverging token."""
    tokens, ref_tokens = row["tokens"], ref["tokens"]
    last = next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens, strict=True)) if a != b), len(tokens) - 1)
    gap = max(abs(a - b) for a, b in zip(row["logprobs"][: last + 1], ref["logprobs"][: last + 1], strict=True))
    return tokens == ref_tokens, gap


@pytest.fixture(scope="module")
def w8a8(prompt_ids, tmp_path_factory):
    """The int8 tiny model and its mixed batch, with the plugin and without."""
    root = build_tiny_quantized(tmp_path_factory.mktemp("tiny-w8a8"))
    on = run_mixed_batch(root, prompt_ids, tmp_path_factory, plugin=True, eager=True, variant="-w8a8")
    off = run_mixed_batch(root, prompt_ids, tmp_path_factory, plugin=False, eager=True, variant="-w8a8")
    return root, on, off


def test_quantized_mixed_batch(w8a8, prompt_ids, tmp_path_factory):
    _, on, off = w8a8

    # vLLM really served it quantized: int8 GEMMs in every decoder linear
    (log,) = tmp_path_factory.getbasetemp().glob("plugin-eager-w8a8[0-9]*/engine.log")  # not pytest's *current link
    text = log.read_text()
    assert "quantization=compressed-tensors" in text
    assert "CPUInt8ScaledMMLinearKernel for CompressedTensorsW8A8Int8" in text

    (status,) = on["status"]
    assert status["hooked"] is True and len(status["profiles"]) == 8

    # exact: unsteered rows and the prefix-cache replay untouched by the plugin
    rows = mixed_rows(prompt_ids)
    for row, base, (_, setting) in zip(on["phases"][0], off["phases"][0], rows, strict=True):
        if setting is None:
            assert (row["tokens"], row["logprobs"]) == (base["tokens"], base["logprobs"]), "unsteered must be bit-equal"
    assert on["phases"][2] == off["phases"][2]
    assert_every_setting_moves(on["phases"][0], "w8a8")


def test_quantized_rows_near_the_hf_reference(w8a8, prompt_ids):
    root, on, _ = w8a8
    rows = mixed_rows(prompt_ids)
    phase0 = on["phases"][0]
    # against HF with hooks, its quantized linears computing as vLLM's int8 kernel (vllm_steer.testing.int8)
    reference = hf_reference_for(root)
    compared = [(setting, row, reference(ids, setting)) for row, (ids, setting) in zip(phase0, rows, strict=True)]
    compared.append((NEW_STEERING, on["phases"][1][0], reference(prompt_ids[LONG], NEW_STEERING)))
    results = [(setting, *_deviation(row, ref)) for setting, row, ref in compared]
    table = "\n".join(f"  {equal!s:5} {gap:.2e} {setting}" for setting, equal, gap in results)
    worst = max(gap for _, _, gap in results)
    equal = sum(1 for _, eq, _ in results if eq)
    tight = sum(1 for _, eq, gap in results if eq and gap <= TIGHT)
    unsteered = [(equal, gap) for setting, equal, gap in results if setting is None]
    assert all(equal and gap <= TIGHT for equal, gap in unsteered), f"an unsteered row is off:\n{table}"
    assert worst <= ROW_TOLERANCE, f"a row {worst:.3f} from the reference:\n{table}"
    assert equal >= MIN_TOKEN_EQUAL * len(results), f"{equal}/{len(results)} rows token-equal:\n{table}"
    assert tight >= MIN_TIGHT * len(results), f"{tight}/{len(results)} rows within {TIGHT}:\n{table}"
