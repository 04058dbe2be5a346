"""The model fingerprint: what a profile was made for, computed one way for the engine, calibration and import.

A fingerprint (:class:`~vllm_steer.core.profile.ModelFingerprint`) has two parts.

**Shape** — the architecture (the HF ``architectures`` name), the hidden size and the number of decoder
layers. A profile whose shape differs from the served model's is always refused: its vectors would not
fit, or would land on layers that mean something else.

**Identity** — which checkpoint and tokenizer, within one shape:

- ``vocab_size`` from the config;
- ``tokenizer_sha256``: SHA-256 of the tokenizer's vocabulary (every token string with its id, added
  tokens included; not the chat template);
- ``embedding_sha256``: SHA-256 of the input-embedding matrix's shape and 16 fixed rows (the first 8 and
  8 from the middle of the vocabulary), rounded to bfloat16 so float32/float16/bfloat16 copies of one
  checkpoint agree.

Two fine-tunes of one base model usually share the shape and the tokenizer and differ in the embedding
rows; a base model and its instruct tune can differ in both. By default identity differences are logged
as a warning and the profile loads (steering vectors often transfer between fine-tunes of a base, and
that is the user's call); with strict matching (``strict_model_match``, ``--steer-strict-model-match``)
every identity field must be known on both sides and equal.

Every caller computes the fingerprint with this module: the engine from the HF config vLLM resolved and
the model's files (:func:`fingerprint_from_config` with :func:`model_identity`), calibration, import and
the Ray ingress from the model directory (:func:`fingerprint_from_dir`). Identity is read from the
checkpoint *files*, not from the loaded model: under tensor parallelism each rank holds only a slice of
the vocabulary-parallel embedding (and a quantized model's weights are not the checkpoint's), while the
files are the same for every rank and every process. A model without safetensors files (a GGUF file, a
``.bin`` checkpoint) has no ``embedding_sha256``; one whose tokenizer cannot be loaded by ``transformers``
has no ``tokenizer_sha256``: strict matching then refuses, naming the field.

Multimodal configs keep the language model's sizes in ``text_config``; the architecture is always the
outer config's (what vLLM resolves the model by). A config without ``architectures`` falls back to its
``model_type``, then ``"unknown"``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_steer.core.profile import ModelFingerprint

__all__ = ["ModelIdentity", "fingerprint_from_config", "fingerprint_from_dir", "model_identity", "EMBEDDING_ROWS"]

logger = logging.getLogger(__name__)

EMBEDDING_ROWS = 8
"""Rows hashed from the start and from the middle of the embedding matrix (16 in all)."""
_EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "tok_embeddings.weight")


@dataclass(frozen=True)
class ModelIdentity:
    """Which tokenizer and checkpoint (the identity part of a fingerprint); ``None`` where unknown."""

    tokenizer_sha256: str | None = None
    embedding_sha256: str | None = None


def fingerprint_from_config(
    config: Any, *, text_config: Any = None, name: str | None = None, identity: ModelIdentity | None = None
) -> ModelFingerprint:
    """The fingerprint of a model from its HF ``PretrainedConfig`` (or anything with the same attributes).

    ``text_config`` is where the sizes are (default: ``config.text_config`` if it has one, else
    ``config``); ``name`` is recorded for people (not compared); ``identity`` comes from
    :func:`model_identity` (none: the identity hashes stay unknown).
    """
    text = text_config if text_config is not None else (getattr(config, "text_config", None) or config)
    archs = getattr(config, "architectures", None)
    architecture = archs[0] if archs else (getattr(config, "model_type", None) or "unknown")
    vocab = getattr(text, "vocab_size", None)
    identity = identity or ModelIdentity()
    return ModelFingerprint(
        architecture=str(architecture),
        hidden_size=text.hidden_size,
        num_layers=text.num_hidden_layers,
        name=name,
        vocab_size=vocab if isinstance(vocab, int) and vocab > 0 else None,
        tokenizer_sha256=identity.tokenizer_sha256,
        embedding_sha256=identity.embedding_sha256,
    )


def fingerprint_from_dir(model: str | Path, *, tokenizer: str | Path | None = None) -> ModelFingerprint:
    """The fingerprint of the model in a directory (or hub id): its config and files, no weights loaded."""
    from transformers import AutoConfig

    return fingerprint_from_config(
        AutoConfig.from_pretrained(str(model)),
        name=Path(str(model)).name,
        identity=model_identity(str(model), str(tokenizer) if tokenizer is not None else None),
    )


@functools.lru_cache(maxsize=16)
def model_identity(model: str, tokenizer: str | None = None, revision: str | None = None) -> ModelIdentity:
    """The identity hashes of the model at ``model`` (a directory, or a hub id already in the local cache).

    ``tokenizer`` is where the tokenizer is, when not with the weights. Never downloads; anything that
    cannot be read is ``None`` (logged at debug level), never an error: strict matching decides.
    """
    directory = _local_dir(model, revision)
    tok_dir = _local_dir(tokenizer, revision) if tokenizer and tokenizer != model else directory
    return ModelIdentity(
        tokenizer_sha256=_tokenizer_hash(tok_dir) if tok_dir is not None else None,
        embedding_sha256=_embedding_hash(directory) if directory is not None else None,
    )


def _local_dir(model: str, revision: str | None) -> Path | None:
    """The local directory of a model or tokenizer; ``None`` for a single file (a GGUF: quantized weights)."""
    path = Path(model)
    if path.is_dir():
        return path
    if path.exists() or path.suffix == ".gguf":
        return None
    try:  # a hub id: only what is already in the local cache
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, revision=revision, local_files_only=True))
    except Exception as exc:  # noqa: BLE001 - not cached / not a repo id: unknown identity
        logger.debug("vllm-steer: no local files for %s (%s): identity unknown", model, exc)
        return None


def _tokenizer_hash(directory: Path) -> str | None:
    try:
        from transformers import AutoTokenizer

        vocab = AutoTokenizer.from_pretrained(str(directory)).get_vocab()
    except Exception as exc:  # noqa: BLE001 - no tokenizer files, or a format transformers cannot read
        logger.debug("vllm-steer: no tokenizer in %s (%s): tokenizer_sha256 unknown", directory, exc)
        return None
    if not vocab:
        return None
    items = sorted(vocab.items(), key=lambda kv: (kv[1], kv[0]))
    return hashlib.sha256(json.dumps(items, ensure_ascii=False, separators=(",", ":")).encode()).hexdigest()


def _embedding_hash(directory: Path) -> str | None:
    try:
        import torch
        from safetensors import safe_open

        found = _embedding_tensor(directory)
        if found is None:
            return None
        file, name = found
        with safe_open(str(file), framework="pt") as handle:
            sliced = handle.get_slice(name)
            shape = list(sliced.get_shape())
            if len(shape) != 2 or shape[0] < 2 * EMBEDDING_ROWS:
                return None
            mid = shape[0] // 2
            rows = torch.cat([sliced[:EMBEDDING_ROWS], sliced[mid : mid + EMBEDDING_ROWS]])
        data = rows.to(torch.bfloat16).view(torch.int16).numpy().tobytes()
    except Exception as exc:  # noqa: BLE001 - unreadable files: unknown, and strict matching will say so
        logger.debug("vllm-steer: cannot read the embeddings in %s (%s): embedding_sha256 unknown", directory, exc)
        return None
    return hashlib.sha256(json.dumps(shape).encode() + data).hexdigest()


def _embedding_tensor(directory: Path) -> tuple[Path, str] | None:
    """The safetensors file and tensor name of the input embeddings, from the index or the files."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map: dict[str, str] = json.loads(index.read_text()).get("weight_map", {})
        name = _embedding_name(weight_map)
        return (directory / weight_map[name], name) if name else None
    from safetensors import safe_open

    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            name = _embedding_name(list(handle.keys()))
        if name:
            return file, name
    return None


def _embedding_name(names: Any) -> str | None:
    """The input embedding among a checkpoint's tensor names: by suffix (``embed_tokens`` first), then name."""
    found = [(i, n) for n in names for i, suffix in enumerate(_EMBEDDING_SUFFIXES) if n.endswith(suffix)]
    return min(found)[1] if found else None
