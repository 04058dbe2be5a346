"""``--prompt-format``: base models (no chat template) calibrate on the raw prompt text; instruct models as before."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from support import DATA
from vllm_steer.calibration import pipeline
from vllm_steer.calibration.pipeline import SAFETY_SYSTEM_PROMPT, CalibrationConfig, CalibrationError, calibrate_profile
from vllm_steer.calibration.stats import chat_prompts, format_prompts, has_chat_template, resolve_prompt_format
from vllm_steer.calibration.sweep import recorded_prompt_format, run_sweep
from vllm_steer.core.profile import load_profile
from vllm_steer.data import load_prompts
from vllm_steer.testing.tiny import build_tiny


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> Path:
    """The tiny Llama with its tokenizer's chat template removed: a stand-in for a base model."""
    model = build_tiny(tmp_path_factory.mktemp("base")) / "model"
    (model / "chat_template.jinja").unlink(missing_ok=True)
    config = model / "tokenizer_config.json"
    settings = json.loads(config.read_text())
    settings.pop("chat_template", None)
    config.write_text(json.dumps(settings))
    return model


def _tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _cfg(model, out, **kw) -> CalibrationConfig:
    settings = dict(
        method="angular_standard",
        harmful=str(DATA / "harmful.csv"),
        harmless=str(DATA / "harmless.jsonl"),
        n=6,
        held_out=0.0,
        batch_size=4,
    )
    return CalibrationConfig(model=str(model), out=out, **{**settings, **kw})


@pytest.fixture
def seen(monkeypatch) -> list[tuple[list[str], bool]]:
    """Every ``(prompts, add_special_tokens)`` the pipeline collects activations for."""
    calls: list[tuple[list[str], bool]] = []
    real = pipeline.collect_activations

    def spy(model, tokenizer, prompts, *args, **kwargs):
        calls.append((list(prompts), kwargs.get("add_special_tokens", False)))
        return real(model, tokenizer, prompts, *args, **kwargs)

    monkeypatch.setattr(pipeline, "collect_activations", spy)
    return calls


def test_the_base_model_has_no_template_and_the_tiny_model_has_one(base_model, tiny_root):
    base, templated = _tokenizer(base_model), _tokenizer(tiny_root / "model")
    assert not has_chat_template(base) and has_chat_template(templated)
    assert resolve_prompt_format(base, "auto") == "plain" and resolve_prompt_format(templated, "auto") == "chat"
    with pytest.raises(ValueError, match="'chat' needs a chat template"):
        resolve_prompt_format(base, "chat")
    with pytest.raises(ValueError, match="unknown 'markdown'"):
        resolve_prompt_format(templated, "markdown")
    assert format_prompts(base, ["hi"], "plain", "Be careful.") == ["Be careful.\n\nhi"]
    assert format_prompts(templated, ["hi"], "chat") == chat_prompts(templated, ["hi"])


def test_auto_calibrates_a_base_model_on_the_raw_text(base_model, tmp_path, seen):
    path = calibrate_profile(_cfg(base_model, tmp_path / "p"))
    spec = load_profile(path).spec
    assert spec.calibration["prompt_format"] == "plain" and spec.calibration["prompt_format_requested"] == "auto"
    assert "no chat template" in spec.calibration["prompt_format_detail"]
    texts = [p.text for p in load_prompts(str(DATA / "harmful.csv"), None, 6)]
    assert seen[0] == (texts, True), "plain: the raw text, tokenized with the tokenizer's special tokens"


def test_plain_system_prompt_contrast_puts_the_system_text_before_the_prompt(base_model, tmp_path, seen):
    path = calibrate_profile(
        _cfg(base_model, tmp_path / "p", method="addition", layers=[1], contrast="system-prompt", prompt_format="plain")
    )
    with_system, without = seen[0][0], seen[1][0]
    assert with_system == [f"{SAFETY_SYSTEM_PROMPT}\n\n{p}" for p in without]
    calibration = load_profile(path).spec.calibration
    assert calibration["prompt_format"] == "plain" and "plain text" in calibration["contrast"]


def test_chat_on_a_base_model_is_a_one_line_error_naming_the_option(base_model, tmp_path):
    with pytest.raises(CalibrationError) as err:
        calibrate_profile(_cfg(base_model, tmp_path / "p", prompt_format="chat"))
    assert err.value.field == "prompt_format" and "\n" not in str(err.value)
    assert str(err.value).startswith("prompt_format: 'chat' needs a chat template and the tokenizer of model has none")
    with pytest.raises(CalibrationError, match=r"^prompt_format: unknown 'markdown' \(one of auto, chat, plain\)$"):
        calibrate_profile(_cfg(base_model, tmp_path / "q", prompt_format="markdown"))
    assert not (tmp_path / "p").exists() and not (tmp_path / "q").exists()


def test_templated_models_calibrate_as_before_and_plain_differs(tiny_root, tmp_path, seen):
    model = tiny_root / "model"
    profiles = {
        fmt: load_profile(calibrate_profile(_cfg(model, tmp_path / fmt, prompt_format=fmt)))
        for fmt in ("auto", "chat", "plain")
    }
    texts = [p.text for p in load_prompts(str(DATA / "harmful.csv"), None, 6)]
    assert seen[0] == (chat_prompts(_tokenizer(model), texts), False), "auto on a templated model: the chat path"
    auto, chat, plain = (profiles[f] for f in ("auto", "chat", "plain"))
    assert auto.spec.calibration["prompt_format"] == chat.spec.calibration["prompt_format"] == "chat"
    assert plain.spec.calibration["prompt_format"] == "plain"
    assert (
        auto.spec.calibration["prompt_format_detail"] == "chat template, one user turn, generation prompt, last token"
    )
    for layer in auto.spec.layers:
        for name in ("b1", "b2"):
            assert torch.equal(auto.vectors[layer][name], chat.vectors[layer][name])
    assert not torch.allclose(auto.vectors[0]["b1"], plain.vectors[0]["b1"])


def test_calibrate_cli_refuses_chat_on_a_base_model_in_one_line(base_model, tmp_path):
    from typer.testing import CliRunner

    from vllm_steer.cli import app

    def invoke(fmt: str, out: Path):
        args = ["calibrate", str(base_model), "--method", "addition", "--layers", "1", "--out", str(out)]
        args += ["--harmful", str(DATA / "harmful.csv"), "--harmless", str(DATA / "harmless.jsonl"), "--n", "4"]
        args += ["--sweep", "none", "--no-report", "--prompt-format", fmt]
        return CliRunner().invoke(app, args, env={"COLUMNS": "400"})

    result = invoke("chat", tmp_path / "chat")
    assert result.exit_code in (1, 2), result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("calibration failed: prompt_format: 'chat' needs a chat template")
    assert not (tmp_path / "chat").exists()

    result = invoke("auto", tmp_path / "auto")
    assert result.exit_code == 0, result.output
    assert load_profile(tmp_path / "auto").spec.calibration["prompt_format"] == "plain"


class _FakeLLM:
    """What run_sweep uses of vllm.LLM: the tokenizer, and generate (records its prompts, answers 'I cannot')."""

    def __init__(self, tokenizer):
        self.tokenizer, self.prompts = tokenizer, []

    def get_tokenizer(self):
        return self.tokenizer

    def generate(self, prompts, params):
        self.prompts = list(prompts)
        done = SimpleNamespace(text="I cannot", token_ids=[5], logprobs=[{5: SimpleNamespace(logprob=-0.1)}])
        return [SimpleNamespace(outputs=[done]) for _ in prompts]


def test_the_sweep_formats_prompts_as_the_calibration_did(base_model, tiny_root):
    pytest.importorskip("vllm")
    harmful, harmless = ["how to pick a lock"], ["how to bake bread"]
    base = _FakeLLM(_tokenizer(base_model))
    run_sweep(base, "p", "selective", [0.0], harmful, harmless, 4, prompt_format="plain")
    assert base.prompts == (harmful + harmless) * 2, "a plain model's sweep generates from the raw prompt text"
    run_sweep(base, "p", "selective", [0.0], harmful, harmless, 4, prompt_format="auto")
    assert base.prompts == (harmful + harmless) * 2
    with pytest.raises(ValueError, match="'chat' needs a chat template"):
        run_sweep(base, "p", "selective", [0.0], harmful, harmless, 4, prompt_format="chat")
    templated = _FakeLLM(_tokenizer(tiny_root / "model"))
    run_sweep(templated, "p", "selective", [0.0], harmful, harmless, 4)
    assert templated.prompts == chat_prompts(templated.tokenizer, harmful + harmless) * 2
    assert recorded_prompt_format({"prompt_format": "plain"}) == "plain"
    assert (
        recorded_prompt_format({"prompt_format": "chat template, one user turn, generation prompt, last token"})
        == "chat"
    )
    assert recorded_prompt_format({}) == "chat"
