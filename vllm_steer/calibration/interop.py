"""Bring your own vectors: import vectors made elsewhere as profiles, export profiles as GGUF control vectors.

Sources ``vllm-steer import`` reads:

* **GGUF control vectors** (llama.cpp ``cvector-generator``, repeng ``export_gguf``):
  ``general.architecture = "controlvector"``, ``controlvector.model_hint``,
  ``controlvector.layer_count`` and one ``direction.<N>`` tensor of width
  ``hidden_size`` per steered layer.
* **safetensors / NumPy** (``.safetensors``, ``.npz``, ``.npy``): one vector per
  layer, either named with the layer index as the last dot-separated part
  (``direction.12``, ``layers.12``, ``12``) or a single ``[num_layers, hidden]``
  matrix (row ``i`` = layer ``i``), or a single ``[hidden]`` vector placed on
  ``--layers``.
* **SAE decoder rows**: rows of a sparse autoencoder's decoder matrix
  (``W_dec``, ``[n_features, hidden]`` as SAELens stores it; the transpose is
  recognised by its shape) picked by feature index — the "safety atoms" of the
  probe/SAE paper — for the one layer the SAE was trained on.

**Layer-index convention** (checked, because an off-by-one silently degrades
steering): ``direction.N`` is added to the residual stream at the *output* of
decoder layer ``N``, counted from 0 — exactly where llama.cpp applies it
(``llama_control_vector::apply_to(cur, il)`` at the end of layer ``il``; it
stores no vector for layer 0 and rejects ``direction.0``) and where repeng's
``ControlModel`` adds it (``model.layers[N]``'s output). That is this project's
``layer_output`` hook of layer ``N``: it changes what layer ``N + 1`` receives, which
Hugging Face reports as ``hidden_states[N + 1]`` (index 0 is the embeddings), not ``[N]``. A file whose indices count
Hugging Face ``hidden_states`` (0 = embeddings) is one off: import it with
``layer_offset=-1``. An SAE on ``blocks.N.hook_resid_post`` is layer ``N``; one
on ``blocks.N.hook_resid_pre`` reads the output of layer ``N - 1``.

Export writes the same convention back, so a profile exported and re-imported
round-trips exactly, and a llama.cpp user gets ``scale · v`` added where this
engine adds it. Only constant additions travel: rotations and ablations depend
on the hidden state and have no GGUF control-vector form.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vllm_steer.core.errors import SteerError
from vllm_steer.core.fingerprint import fingerprint_from_dir as model_fingerprint
from vllm_steer.core.methods import METHODS, methods_where
from vllm_steer.core.profile import ModelFingerprint, Profile, ProfileSpec, save_profile

__all__ = [
    "VectorImportError",
    "VectorSource",
    "model_fingerprint",
    "read_gguf_control_vector",
    "read_vector_file",
    "read_sae_features",
    "profile_from_vectors",
    "import_vectors",
    "export_gguf",
    "export_vectors",
    "IMPORT_METHODS",
    "EXPORT_METHODS",
]

IMPORT_METHODS = methods_where(lambda m: m.roles == "vector")
"""What imported vectors become (the methods with one ``vector`` per layer: addition, probe, ablation):
``addition`` keeps their length as the gain, ``probe`` and ``ablation`` use their unit direction."""
EXPORT_METHODS = methods_where(lambda m: m.constant_addition)
"""What exports as a control vector: the methods that add a constant vector (addition, probe, category)."""

_LAYER_SUFFIX = re.compile(r"(?:^|[._/-])(\d+)$")


class VectorImportError(SteerError):
    """A source that cannot become a profile; ``field`` names the file part to fix (``source``, also ``path``: the file)."""

    def __init__(self, source: str | Path, field: str, message: str):
        self.source = str(source)
        super().__init__(field, message, source)


@dataclass
class VectorSource:
    """Vectors per layer (already in this project's layer convention) and where they came from."""

    vectors: dict[int, torch.Tensor]
    origin: dict

    def __post_init__(self) -> None:
        self.vectors = dict(sorted(self.vectors.items()))


def _gguf_string(reader, key: str) -> str | None:
    field = reader.get_field(key)
    if field is None:
        return None
    value = field.contents()
    return value if isinstance(value, str) else str(value)


def _gguf_int(reader, key: str) -> int | None:
    field = reader.get_field(key)
    return None if field is None else int(field.contents())


def read_gguf_control_vector(
    path: str | Path,
    fp: ModelFingerprint,
    layer_offset: int = 0,
    check_model_hint: bool = True,
    layers: Sequence[int] | None = None,
) -> VectorSource:
    """Read a llama.cpp/repeng control vector, checking its architecture, hint, width and layer indices.

    ``layers`` keeps a subset of the file's layers (after ``layer_offset``)."""
    import gguf

    path = Path(path)
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as err:  # gguf raises ValueError/struct.error/OSError on bad files
        raise VectorImportError(path, "file", f"not a readable GGUF file ({err})") from err
    arch = _gguf_string(reader, "general.architecture")
    if arch != "controlvector":
        raise VectorImportError(path, "general.architecture", f"is {arch!r}, a control vector has 'controlvector'")
    hint = _gguf_string(reader, "controlvector.model_hint")
    if check_model_hint and hint and not _hint_matches(hint, fp.architecture):
        raise VectorImportError(
            path,
            "controlvector.model_hint",
            f"{hint!r} does not match the model's architecture {fp.architecture!r} "
            "(pass --ignore-model-hint if the file is known to fit)",
        )
    vectors: dict[int, torch.Tensor] = {}
    for tensor in reader.tensors:
        match = re.fullmatch(r"direction\.(\d+)", tensor.name)
        if match is None:
            raise VectorImportError(
                path, tensor.name, "unexpected tensor; a control vector holds only direction.<layer>"
            )
        index = int(match.group(1))
        if index == 0 and layer_offset == 0:
            raise VectorImportError(
                path,
                tensor.name,
                "layer index 0 is invalid in a control vector (llama.cpp never applies "
                "it); if the file counts hidden_states from the embeddings, pass --layer-offset -1",
            )
        data = np.asarray(tensor.data, dtype=np.float32).reshape(-1)
        vectors[_shifted(path, tensor.name, index, layer_offset, fp)] = _vector(path, tensor.name, data, fp)
    if not vectors:
        raise VectorImportError(path, "tensors", "no direction.<layer> tensors")
    count = _gguf_int(reader, "controlvector.layer_count")
    if count is not None and count != len(vectors):
        raise VectorImportError(
            path, "controlvector.layer_count", f"says {count} but the file has {len(vectors)} direction tensors"
        )
    return VectorSource(
        _subset(path, vectors, layers),
        {
            "format": "gguf",
            "file": path.name,
            "model_hint": hint,
            "layer_offset": layer_offset,
            "convention": "direction.N is added at the output of decoder layer N (0-based)",
        },
    )


_LLAMA_CPP_ALIASES = {"llama": ("MistralForCausalLM", "MixtralForCausalLM")}
"""llama.cpp model hints that name other architectures too (it converts Mistral and Mixtral as ``llama``)."""


def _hint_matches(hint: str, architecture: str) -> bool:
    norm = lambda s: re.sub(r"[^a-z0-9]", "", s.lower())  # noqa: E731
    if architecture in _LLAMA_CPP_ALIASES.get(norm(hint), ()):
        return True
    return norm(hint) in norm(architecture) or norm(architecture).startswith(norm(hint))


def _shifted(path: Path, name: str, index: int, offset: int, fp: ModelFingerprint) -> int:
    layer = index + offset
    if not 0 <= layer < fp.num_layers:
        raise VectorImportError(path, name, f"maps to layer {layer}, outside the model's layers 0..{fp.num_layers - 1}")
    return layer


def _vector(path: Path, name: str, data: np.ndarray, fp: ModelFingerprint) -> torch.Tensor:
    if data.shape != (fp.hidden_size,):
        raise VectorImportError(
            path,
            name,
            f"has width {data.shape[-1] if data.ndim else 0}, the model's hidden_size is "
            f"{fp.hidden_size} (a vector for another model?)",
        )
    t = torch.from_numpy(np.array(data, dtype=np.float32))
    if not torch.isfinite(t).all():
        raise VectorImportError(path, name, "has NaN or inf values")
    if float(t.norm()) == 0.0:
        raise VectorImportError(path, name, "is all zeros")
    return t


def _load_arrays(path: Path) -> dict[str, np.ndarray]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.numpy import load_file

            return {k: v.astype(np.float32) for k, v in load_file(str(path)).items()}
        if suffix == ".npz":
            with np.load(str(path), allow_pickle=False) as z:
                return {k: np.asarray(z[k], dtype=np.float32) for k in z.files}
        if suffix == ".npy":
            return {"": np.asarray(np.load(str(path), allow_pickle=False), dtype=np.float32)}
    except FileNotFoundError as err:
        raise VectorImportError(path, "file", "not found") from err
    except Exception as err:  # each reader has its own error types for corrupt files
        raise VectorImportError(path, "file", f"cannot be read as {suffix[1:]} ({err})") from err
    raise VectorImportError(path, "file", f"unknown extension {suffix!r} (.gguf, .safetensors, .npz or .npy)")


def read_vector_file(
    path: str | Path,
    fp: ModelFingerprint,
    layers: Sequence[int] | None = None,
    layer_offset: int = 0,
    key: str | None = None,
) -> VectorSource:
    """Vectors per layer from safetensors/NumPy, in one of the three layouts the module docstring lists."""
    path = Path(path)
    arrays = _load_arrays(path)
    if key is not None:
        if key not in arrays:
            raise VectorImportError(path, "key", f"{key!r} is not in the file (it has {sorted(arrays)[:8]})")
        arrays = {key: arrays[key]}
    if len(arrays) == 1:
        ((name, array),) = arrays.items()
        label = name or path.name
        if array.ndim == 2:
            if layers is not None:
                raise VectorImportError(
                    path, label, "a [num_layers, hidden] matrix names its own layers; drop --layers"
                )
            if array.shape[0] != fp.num_layers:
                raise VectorImportError(
                    path, label, f"has {array.shape[0]} rows, the model has {fp.num_layers} layers (row i = layer i)"
                )
            vectors = {i: _vector(path, f"{label}[{i}]", array[i], fp) for i in range(array.shape[0])}
            return VectorSource(vectors, {"format": path.suffix[1:], "file": path.name, "layout": "matrix"})
        if array.ndim == 1 and _LAYER_SUFFIX.search(name) is None:
            if not layers:
                raise VectorImportError(path, "layers", "a single vector needs --layers to say where it goes")
            vec = _vector(path, label, array, fp)
            for layer in layers:
                _shifted(path, "layers", layer, 0, fp)
            return VectorSource(
                {layer: vec.clone() for layer in layers},
                {"format": path.suffix[1:], "file": path.name, "layout": "single vector"},
            )
    vectors = {}
    for name, array in arrays.items():
        match = _LAYER_SUFFIX.search(name)
        if match is None:
            raise VectorImportError(
                path, name, "cannot tell its layer: name vectors '<anything>.<layer>' or pass --key"
            )
        layer = _shifted(path, name, int(match.group(1)), layer_offset, fp)
        if layer in vectors:
            raise VectorImportError(path, name, f"a second vector for layer {layer}")
        vectors[layer] = _vector(path, name, array.reshape(-1) if array.ndim == 1 else array, fp)
    vectors = _subset(path, vectors, layers)
    return VectorSource(
        vectors,
        {"format": path.suffix[1:], "file": path.name, "layout": "named per layer", "layer_offset": layer_offset},
    )


def _subset(path: Path, vectors: dict[int, torch.Tensor], layers: Sequence[int] | None) -> dict[int, torch.Tensor]:
    """Only ``layers`` (all of them when ``None``); a layer the file has no vector for is an error."""
    if layers is None:
        return vectors
    missing = sorted(set(layers) - set(vectors))
    if missing:
        raise VectorImportError(path, "layers", f"{missing} have no vector in the file (it has {sorted(vectors)})")
    return {layer: vectors[layer] for layer in layers}


def read_sae_features(
    path: str | Path, fp: ModelFingerprint, features: Sequence[int], layer: int, key: str = "W_dec"
) -> VectorSource:
    """The normalized sum of the unit decoder rows of ``features`` (one direction), for ``layer``."""
    path = Path(path)
    arrays = _load_arrays(path)
    if key not in arrays:
        raise VectorImportError(
            path, "key", f"{key!r} is not in the file (it has {sorted(arrays)[:8]}); pass --sae-key"
        )
    w = arrays[key]
    d = fp.hidden_size
    if w.ndim != 2 or d not in w.shape:
        raise VectorImportError(path, key, f"has shape {tuple(w.shape)}, expected [n_features, {d}] (hidden_size {d})")
    if w.shape[1] != d:  # stored [hidden, n_features]
        w = w.T
    if not features:
        raise VectorImportError(path, "features", "name at least one feature index")
    bad = [f for f in features if not 0 <= f < w.shape[0]]
    if bad:
        raise VectorImportError(
            path, "features", f"{bad} outside 0..{w.shape[0] - 1} (the SAE has {w.shape[0]} features)"
        )
    rows = [_vector(path, f"{key}[{f}]", w[f], fp) for f in features]
    direction = torch.stack([r / r.norm() for r in rows]).sum(0)
    if float(direction.norm()) < 1e-6:
        raise VectorImportError(path, "features", "the chosen rows cancel out")
    _shifted(path, "layer", layer, 0, fp)
    return VectorSource(
        {layer: direction / direction.norm()},
        {
            "format": "sae",
            "file": path.name,
            "key": key,
            "features": list(features),
            "combination": "normalized sum of unit decoder rows",
        },
    )


def profile_from_vectors(
    source: VectorSource,
    fp: ModelFingerprint,
    profile_id: str,
    method: str = "addition",
    scale: float = 1.0,
    scale_range: tuple[float, float] = (-4.0, 4.0),
    description: str = "",
) -> tuple[ProfileSpec, dict[int, dict[str, torch.Tensor]]]:
    """A validated spec and its tensors; ``probe``/``ablation`` keep only each vector's direction."""
    if method not in IMPORT_METHODS:
        raise VectorImportError(
            source.origin.get("file", "<vectors>"),
            "method",
            f"{method!r}: imported vectors become one of {', '.join(IMPORT_METHODS)}",
        )
    entry = METHODS[method]
    vectors = {
        layer: {"vector": v.clone() if entry.norm == "gain" else (v / v.norm())} for layer, v in source.vectors.items()
    }
    layers = sorted(vectors)
    uses_scale = entry.parameter == "scale"
    spec = ProfileSpec(
        format_version=1,
        id=profile_id,
        method=method,
        model=fp,
        layers=layers,
        tensors={layer: {"vector": f"vector.{layer}"} for layer in layers},
        defaults={"scale": scale} if uses_scale else {},
        allowed={"scale": {"min": scale_range[0], "max": scale_range[1]}} if uses_scale else {},
        calibration={
            "imported_from": source.origin,
            "norms": {str(layer): float(v.norm()) for layer, v in source.vectors.items()},
        },
        description=description or f"{method} profile imported from {source.origin.get('file')}",
    )
    return spec, vectors


def import_vectors(
    source: VectorSource,
    fp: ModelFingerprint,
    out: str | Path,
    profile_id: str,
    method: str = "addition",
    scale: float = 1.0,
    scale_range: tuple[float, float] = (-4.0, 4.0),
) -> Path:
    """Write ``source`` as a profile directory (validated by the same loader the server uses)."""
    spec, vectors = profile_from_vectors(source, fp, profile_id, method, scale, scale_range)
    return save_profile(out, spec, vectors)


def export_vectors(
    profile: Profile, scale: float | None = None, categories: Sequence[str] | None = None
) -> dict[int, torch.Tensor]:
    """What the profile adds at each layer's output at ``scale`` (default: the profile's): ``scale · v``."""
    spec = profile.spec
    if spec.method is None:
        raise VectorImportError(spec.id, "method", "a gate-only profile steers nothing: there is no vector to export")
    if spec.method not in EXPORT_METHODS:
        raise VectorImportError(
            spec.id,
            "method",
            f"{spec.method!r} is not a constant addition (it depends on the hidden "
            f"state); only {_listed(EXPORT_METHODS)} profiles export as control vectors",
        )
    scale = spec.defaults.scale if scale is None else scale
    assert scale is not None  # ProfileSpec requires defaults.scale of every method that has a scale
    if METHODS[spec.method].roles == "categories":
        chosen = list(categories) if categories else (["generic"] if "generic" in spec.categories else spec.categories)
        unknown = [c for c in chosen if c not in spec.categories]
        if unknown:
            raise VectorImportError(spec.id, "categories", f"unknown {unknown} (the profile has {spec.categories})")
        return {layer: scale * torch.stack([profile.vectors[layer][c] for c in chosen]).sum(0) for layer in spec.layers}
    if categories:
        raise VectorImportError(spec.id, "categories", "only category profiles have categories")
    return {layer: scale * profile.vectors[layer]["vector"] for layer in spec.layers}


def export_gguf(
    profile: Profile,
    path: str | Path,
    scale: float | None = None,
    categories: Sequence[str] | None = None,
    model_hint: str | None = None,
) -> Path:
    """Write ``profile`` as a llama.cpp control vector (``direction.N`` at layer N's output)."""
    import gguf

    vectors = export_vectors(profile, scale, categories)
    if 0 in vectors:
        raise VectorImportError(
            profile.spec.id, "layers", "layer 0 cannot be expressed: llama.cpp never applies direction.0"
        )
    path = Path(path)
    hint = model_hint or _default_hint(profile.spec.model.architecture)
    writer = gguf.GGUFWriter(str(path), "controlvector")
    writer.add_string("controlvector.model_hint", hint)
    writer.add_uint32("controlvector.layer_count", len(vectors))
    for layer, vec in sorted(vectors.items()):
        writer.add_tensor(f"direction.{layer}", vec.to(torch.float32).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _listed(names: Sequence[str]) -> str:
    """``a, b and c``."""
    return " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else list(names))


def _default_hint(architecture: str) -> str:
    """``LlamaForCausalLM`` → ``llama``: the model-type spelling llama.cpp and repeng write."""
    return (
        re.sub(r"(ForCausalLM|ForConditionalGeneration|LMHeadModel|Model)$", "", architecture).lower() or architecture
    )
