"""One fingerprint function: the engine, calibration, import and the Ray ingress compute the same fingerprint."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from vllm_steer.calibration.interop import model_fingerprint
from vllm_steer.calibration.pipeline import _fingerprint as calibration_fingerprint
from vllm_steer.core.fingerprint import fingerprint_from_config, fingerprint_from_dir
from vllm_steer.core.profile import ModelFingerprint
from vllm_steer.engine.vllm._profiles import fingerprint_of

EXPECTED = ModelFingerprint(architecture="LlamaForCausalLM", hidden_size=64, num_layers=3)


@pytest.fixture(scope="module")
def config():
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=96,
        architectures=["LlamaForCausalLM"],
    )


def _vllm_config(hf_config, hf_text_config, hidden_size):
    """The shape of vLLM's VllmConfig the engine glue reads (model_config.hf_config / hf_text_config)."""
    model_config = SimpleNamespace(
        hf_config=hf_config, hf_text_config=hf_text_config, get_hidden_size=lambda: hidden_size
    )
    return SimpleNamespace(model_config=model_config)


def test_from_an_hf_config(config):
    assert fingerprint_from_config(config) == EXPECTED
    assert fingerprint_from_config(config, name="tiny") == EXPECTED.model_copy(update={"name": "tiny"})


def test_from_a_model_dir(config, tmp_path):
    config.save_pretrained(tmp_path / "tiny-llama")
    expected = EXPECTED.model_copy(update={"name": "tiny-llama"})
    assert fingerprint_from_dir(tmp_path / "tiny-llama") == expected
    assert model_fingerprint(str(tmp_path / "tiny-llama")) == expected  # `vllm-steer import` uses the same one


def test_from_vllm_model_config(config):
    assert fingerprint_of(_vllm_config(config, config, 64)) == EXPECTED


def test_from_a_loaded_model(config):
    model = SimpleNamespace(config=config)
    assert calibration_fingerprint(model, "/models/tiny") == EXPECTED.model_copy(update={"name": "tiny"})


def test_multimodal_configs_take_sizes_from_the_text_config():
    text = SimpleNamespace(hidden_size=32, num_hidden_layers=5, architectures=None)
    outer = SimpleNamespace(
        architectures=["LlavaForConditionalGeneration"], text_config=text, hidden_size=1024, num_hidden_layers=24
    )
    expected = ModelFingerprint(architecture="LlavaForConditionalGeneration", hidden_size=32, num_layers=5)
    assert fingerprint_from_config(outer) == expected
    assert fingerprint_of(_vllm_config(outer, text, 32)) == expected


def test_a_config_without_architectures_falls_back_to_its_model_type():
    bare = SimpleNamespace(architectures=None, model_type="llama", hidden_size=8, num_hidden_layers=2)
    assert fingerprint_from_config(bare).architecture == "llama"
    assert fingerprint_of(_vllm_config(bare, bare, 8)).architecture == "llama"
    assert fingerprint_from_config(SimpleNamespace(hidden_size=8, num_hidden_layers=2)).architecture == "unknown"


def test_profiles_for_another_width_are_refused_by_the_engine_fingerprint(config):
    other = SimpleNamespace(architectures=["LlamaForCausalLM"], hidden_size=128, num_hidden_layers=3)
    problem = EXPECTED.mismatch(fingerprint_of(_vllm_config(other, other, 128)))
    assert problem == "hidden_size is 64 but the served model has 128"
