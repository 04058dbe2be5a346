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
