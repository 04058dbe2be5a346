"""The model fingerprint: what a profile was made for, computed one way for the engine, calibration and import.

A fingerprint is the architecture (the HF ``architectures`` name), the hidden size and the number of
decoder layers (:class:`~vllm_steer.core.profile.ModelFingerprint`); a profile is refused on a model
whose fingerprint differs. Every caller hands :func:`fingerprint_from_config` the model's Hugging Face
config (the engine: vLLM's ``model_config.hf_config`` and ``hf_text_config``; calibration: the loaded
model's ``config``; import and the Ray ingress: the config in the model directory, through
:func:`fingerprint_from_dir`), so the three cannot drift apart.

Multimodal configs keep the language model's sizes in ``text_config``; the architecture is always the
outer config's (what vLLM resolves the model by). A config without ``architectures`` falls back to its
``model_type``, then ``"unknown"``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vllm_steer.core.profile import ModelFingerprint

__all__ = ["fingerprint_from_config", "fingerprint_from_dir"]


def fingerprint_from_config(config: Any, *, text_config: Any = None, name: str | None = None) -> ModelFingerprint:
    """The fingerprint of a model from its HF ``PretrainedConfig`` (or anything with the same attributes).

    ``text_config`` is where the sizes are (default: ``config.text_config`` if it has one, else
    ``config``); ``name`` is recorded for people (not compared).
    """
    text = text_config if text_config is not None else (getattr(config, "text_config", None) or config)
    archs = getattr(config, "architectures", None)
    architecture = archs[0] if archs else (getattr(config, "model_type", None) or "unknown")
    return ModelFingerprint(
        architecture=str(architecture), hidden_size=text.hidden_size, num_layers=text.num_hidden_layers, name=name
    )


def fingerprint_from_dir(model: str | Path) -> ModelFingerprint:
    """The fingerprint of the model in a directory (or hub id) from its config alone (no weights loaded)."""
    from transformers import AutoConfig

    return fingerprint_from_config(AutoConfig.from_pretrained(str(model)), name=Path(str(model)).name)
