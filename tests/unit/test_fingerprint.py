"""One fingerprint function: the engine, calibration, import and the Ray ingress compute the same fingerprint."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from vllm_steer.calibration.interop import model_fingerprint
from vllm_steer.calibration.pipeline import _fingerprint as calibration_fingerprint
from vllm_steer.core.fingerprint import fingerprint_from_config, fingerprint_from_dir
from vllm_steer.core.profile import ModelFingerprint
from vllm_steer.engine.vllm._profiles import fingerprint_of

EXPECTED = ModelFingerprint(architecture="LlamaForCausalLM", hidden_size=64, num_layers=3, vocab_size=96)


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


# ---------------------------------------------------------------- identity: tokenizer and checkpoint


def _tokenizer(words: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0]))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=words[0])


WORDS = ["<unk>"] + [f"w{i}" for i in range(95)]


def _checkpoint(config, path, *, seed=0, words=WORDS, dtype=None, shard=None, safetensors=True):
    """A random checkpoint of ``config`` with a word-level tokenizer: what a model directory holds."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    if dtype is not None:
        model = model.to(dtype)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(path, **kwargs)
    if not safetensors:  # a .bin checkpoint instead (transformers 5 always writes safetensors)
        for file in path.glob("*.safetensors"):
            file.unlink()
        torch.save(model.state_dict(), path / "pytorch_model.bin")
    _tokenizer(words).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def base(config, tmp_path_factory):
    return _checkpoint(config, tmp_path_factory.mktemp("fp") / "base")


def test_a_model_dir_has_its_identity(base):
    fp = fingerprint_from_dir(base)
    assert fp.vocab_size == 96
    assert fp.tokenizer_sha256 is not None and len(fp.tokenizer_sha256) == 64
    assert fp.embedding_sha256 is not None and len(fp.embedding_sha256) == 64


def test_identity_does_not_depend_on_dtype_or_sharding(config, base, tmp_path):
    """One checkpoint saved as bfloat16, or split in shards (with an index), is the same model."""
    import torch

    ours = fingerprint_from_dir(base).model_copy(update={"name": None})
    as_bf16 = fingerprint_from_dir(_checkpoint(config, tmp_path / "bf16", dtype=torch.bfloat16))
    sharded = fingerprint_from_dir(_checkpoint(config, tmp_path / "shards", shard="20KB"))
    assert (tmp_path / "shards" / "model.safetensors.index.json").exists()
    assert as_bf16.model_copy(update={"name": None}) == ours
    assert sharded.model_copy(update={"name": None}) == ours


def test_another_checkpoint_and_another_tokenizer_differ(config, base, tmp_path):
    ours = fingerprint_from_dir(base)
    tuned = fingerprint_from_dir(_checkpoint(config, tmp_path / "tuned", seed=1))
    retok = fingerprint_from_dir(_checkpoint(config, tmp_path / "retok", words=list(reversed(WORDS))))
    assert ours.mismatch(tuned) is None and ours.mismatch(retok) is None  # same shape: loads by default
    assert ours.identity_differences(tuned) == ["embedding_sha256"]
    assert ours.identity_differences(retok) == ["tokenizer_sha256"]
    assert "embedding_sha256" in (ours.mismatch(tuned, strict=True) or "")
    assert "tokenizer_sha256" in (ours.mismatch(retok, strict=True) or "")
    assert ours.mismatch(ours, strict=True) is None


def test_unknown_identity_is_refused_only_under_strict_matching(config, base, tmp_path):
    ours = fingerprint_from_dir(base)
    old_profile = ours.model_copy(update={"vocab_size": None, "tokenizer_sha256": None, "embedding_sha256": None})
    assert old_profile.mismatch(ours) is None and old_profile.identity_differences(ours) == []
    assert "vocab_size is not recorded in the profile" in (old_profile.mismatch(ours, strict=True) or "")
    no_safetensors = fingerprint_from_dir(_checkpoint(config, tmp_path / "bin", safetensors=False))
    assert no_safetensors.embedding_sha256 is None and no_safetensors.tokenizer_sha256 == ours.tokenizer_sha256
    problem = ours.mismatch(no_safetensors, strict=True) or ""
    assert problem.startswith("embedding_sha256 of the served model could not be computed"), problem


def test_profile_loading_warns_or_refuses(config, base, tmp_path, caplog):
    from vllm_steer.core.profile import ProfileError, load_profile_dir, save_profile
    from vllm_steer.testing.synthetic import random_profile

    ours = fingerprint_from_dir(base)
    tuned = fingerprint_from_dir(_checkpoint(config, tmp_path / "tuned", seed=1))
    profile = random_profile("made-on-base", "addition", ours, [1])
    save_profile(tmp_path / "profiles" / "made-on-base", profile.spec, profile.vectors)
    with caplog.at_level("WARNING", logger="vllm_steer.core.profile"):
        assert list(load_profile_dir(tmp_path / "profiles", tuned)) == ["made-on-base"]
    assert "embedding_sha256 differs" in caplog.text and "strict model matching is off" in caplog.text
    with pytest.raises(ProfileError) as err:
        load_profile_dir(tmp_path / "profiles", tuned, strict=True)
    assert err.value.field == "model" and "embedding_sha256" in str(err.value)
    assert list(load_profile_dir(tmp_path / "profiles", ours, strict=True)) == ["made-on-base"]


def test_engine_calibration_and_import_agree_on_identity(config, base):
    """The engine reads the same files (vLLM's model_config.model / tokenizer) as calibration and import."""
    model_config = SimpleNamespace(
        hf_config=config, hf_text_config=config, model=str(base), tokenizer=str(base), revision=None
    )
    engine = fingerprint_of(SimpleNamespace(model_config=model_config))
    calibration = calibration_fingerprint(SimpleNamespace(config=config), str(base))
    imported = model_fingerprint(str(base))
    assert engine.model_copy(update={"name": "base"}) == calibration == imported
    assert engine.embedding_sha256 is not None


def test_strict_matching_is_a_setting():
    from vllm_steer.core.settings import SteerConfig

    assert SteerConfig.resolve({}, {"VLLM_STEER_STRICT_MODEL_MATCH": "1"}).strict_model_match is True
    assert SteerConfig.resolve({}, {}).strict_model_match is False


def test_a_gguf_file_has_no_embedding_hash_and_takes_the_given_tokenizer(base, tmp_path):
    from vllm_steer.core.fingerprint import ModelIdentity, model_identity

    gguf = tmp_path / "model.Q8_0.gguf"
    gguf.write_bytes(b"GGUF")
    (tmp_path / "model.safetensors").write_bytes(b"")  # a neighbour's files are not the GGUF's
    assert model_identity(str(gguf)) == ModelIdentity()
    with_tokenizer = model_identity(str(gguf), str(base))
    assert with_tokenizer.embedding_sha256 is None
    assert with_tokenizer.tokenizer_sha256 == fingerprint_from_dir(base).tokenizer_sha256


def test_the_engine_loads_profiles_under_its_strict_setting(config, base, tmp_path):
    """The engine's loader (start, hot reload, workers) reads the setting: a fine-tune warns, or is refused."""
    from vllm_steer.core.profile import ProfileError, save_profile
    from vllm_steer.core.settings import SteerConfig
    from vllm_steer.engine.vllm._profiles import load_served
    from vllm_steer.testing.synthetic import random_profile

    profile = random_profile("made-on-base", "probe", fingerprint_from_dir(base), [0, 2])
    save_profile(tmp_path / "profiles" / "made-on-base", profile.spec, profile.vectors)
    tuned = _checkpoint(config, tmp_path / "tuned", seed=1)
    model_config = SimpleNamespace(
        hf_config=config, hf_text_config=config, model=str(tuned), tokenizer=str(tuned), revision=None
    )
    served = SimpleNamespace(model_config=model_config)
    assert list(load_served(SteerConfig(profiles=str(tmp_path / "profiles")), served)) == ["made-on-base"]
    with pytest.raises(ProfileError, match="embedding_sha256"):
        load_served(SteerConfig(profiles=str(tmp_path / "profiles"), strict_model_match=True), served)
