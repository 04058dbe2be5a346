"""Writing llama.cpp/repeng control vectors (GGUF) for the import tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_gguf(
    path: Path,
    tensors: dict[str, np.ndarray],
    hint: str = "llama",
    count: int | None = None,
    arch: str = "controlvector",
) -> Path:
    """A GGUF file with ``tensors`` (``direction.N``), the control-vector metadata and ``hint`` as model hint."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    if arch == "controlvector":
        writer.add_string("controlvector.model_hint", hint)
        writer.add_uint32("controlvector.layer_count", len(tensors) if count is None else count)
    for name, array in tensors.items():
        writer.add_tensor(name, array.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def block_inputs_with_and_without(model, profile, layers=(1, 2)) -> tuple[dict, dict]:
    """What decoder blocks ``layers`` of the HF ``model`` receive (the residual stream after the block before)
    on a fixed prompt, without and then with ``profile`` (its id, default settings) applied by the HF reference."""
    import torch

    from vllm_steer.core.request import parse_steering, resolve_steering
    from vllm_steer.testing.hf_reference import steered

    seen: dict[int, torch.Tensor] = {}

    def record(index):
        def hook(module, args, kwargs):
            seen[index] = (args[0] if args else kwargs["hidden_states"]).clone()

        return hook

    blocks = model.model.layers
    handles = [blocks[i].register_forward_pre_hook(record(i), with_kwargs=True) for i in layers]
    ids = torch.tensor([[1, 50, 60, 70, 80]])
    pid = profile.spec.id
    steering = resolve_steering(parse_steering({"steer_profile": pid}), {pid: profile})
    try:
        with torch.no_grad():
            model(ids)
            base = dict(seen)
            with steered(model, profile, steering):
                model(ids)
    finally:
        for handle in handles:
            handle.remove()
    return base, dict(seen)
