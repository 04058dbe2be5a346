"""An exact Hugging Face stand-in for vLLM's CPU int8 W8A8 linear layers, for the quantized engine test.

vLLM serves a compressed-tensors ``int-quantized`` W8A8 checkpoint on CPU with oneDNN's int8 GEMM
(``CPUInt8ScaledMMLinearKernel``): each token's activations are quantized to int8 at run time (per token,
symmetric or with a zero point), multiplied by the int8 weights in integers, and scaled back. ``transformers``
loads the same checkpoint through compressed-tensors, but (5.x) decompresses the weights to ``q · s`` and runs
float linear layers: no activation quantization at all. This module replaces those layers' forward by the integer
arithmetic itself.

One detail decides whether the two agree: on x86 CPUs without VNNI (AVX2, or AVX-512 without VNNI), oneDNN
multiplies unsigned 8-bit activations (the int8 values shifted by 128) by the signed 8-bit weights with
``vpmaddubsw``, which adds each pair of adjacent products into a **saturating 16-bit** integer before the 32-bit
accumulation. With full-range int8 weights (±127) and activations near 255 a pair exceeds 32767 and is clipped:
a real error of vLLM's kernel on such CPUs, up to ~0.4 in logprob on the tiny test model, that no float
reference reproduces. Measured on the 2-core AVX2 dev box: the emulation with saturation (and vLLM's rounding,
half away from zero) matches vLLM's greedy tokens and logprobs within 3e-6 on random prompts and on every
unsteered row of the engine test; without saturation (and a float reference), 0.13 to 0.40 apart. CPUs with VNNI (``vpdpbusd``: 32-bit accumulation) or AMX do not saturate; :func:`int8_saturates` tells
which this one is.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = ["int8_saturates", "emulate_w8a8"]

_WIDE_INT8 = ("avx512_vnni", "avx_vnni", "amx_int8")
"""CPU flags of the x86 instructions that accumulate u8 × s8 products in 32 bits (no 16-bit saturation)."""


def int8_saturates(cpuinfo: str | None = None) -> bool:
    """Whether oneDNN's int8 GEMM on this CPU saturates pairs of products to 16 bits: an x86 CPU whose flags
    (``/proc/cpuinfo``, or ``cpuinfo``) name none of :data:`_WIDE_INT8`."""
    if cpuinfo is None:
        if platform.machine().lower() not in ("x86_64", "amd64", "i686", "i386"):
            return False
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = {f for line in cpuinfo.splitlines() if line.startswith("flags") for f in line.split(":", 1)[1].split()}
    return not flags & set(_WIDE_INT8)


def _round(v: torch.Tensor) -> torch.Tensor:
    """Round half away from zero, as vLLM's CPU kernel rounds (``std::round``; torch rounds half to even): a
    prompt of the engine test has an activation exactly on a half step, and only this rule matches vLLM there."""
    return torch.sign(v) * torch.floor(v.abs() + 0.5)


def _quantize_tokens(x: torch.Tensor, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token int8 quantization as vLLM's CPU kernel does it: ``(q, scale, zero_point)`` with
    ``x ≈ scale · (q − zero_point)``."""
    if symmetric:
        scale = x.abs().amax(-1, keepdim=True) / 127.0
        q = torch.clamp(_round(x / scale), -127, 127).to(torch.int64)
        return q, scale, torch.zeros_like(q[:, :1])
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    scale = (hi - lo) / 255.0
    zero_point = _round(-128.0 - lo / scale).to(torch.int64)
    q = torch.clamp(_round(x / scale).to(torch.int64) + zero_point, -128, 127)
    return q, scale, zero_point


def _int8_linear(
    weight: torch.Tensor, weight_scale: torch.Tensor, symmetric: bool, saturate: bool
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x → y`` for one linear layer: int8 ``weight`` ``[N, K]`` with one scale per output channel."""
    w = weight.to(torch.int64)
    w_sum = w.sum(-1)
    if w.shape[-1] % 2:
        w = torch.nn.functional.pad(w, (0, 1))
    channel_scale = weight_scale.reshape(1, -1).double()

    def forward(x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        q, scale, zero_point = _quantize_tokens(x.reshape(-1, shape[-1]).float(), symmetric)
        u = q + 128  # oneDNN's unsigned activations (compensated below)
        if u.shape[-1] % 2:
            u = torch.nn.functional.pad(u, (0, 1))
        products = u[:, None, :] * w[None, :, :]
        if saturate:  # vpmaddubsw: adjacent pairs into a saturating int16, then 32-bit sums
            pairs = products.reshape(*products.shape[:2], -1, 2).sum(-1).clamp(-32768, 32767)
            acc = pairs.sum(-1)
        else:
            acc = products.sum(-1)
        dot = acc - (128 + zero_point) * w_sum[None, :]
        y = dot.double() * scale.double() * channel_scale
        return y.to(x.dtype).reshape(*shape[:-1], -1)

    return forward


def emulate_w8a8(model: torch.nn.Module, model_dir: str | Path, saturate: bool | None = None) -> int:
    """Replace the forward of every linear layer that ``model_dir``'s compressed-tensors W8A8 checkpoint
    quantizes (int8 weights with per-channel scales, dynamic per-token int8 activations) by vLLM's CPU integer
    arithmetic; ``saturate``: the 16-bit pair saturation (default: :func:`int8_saturates`). Returns how many
    layers were replaced; a checkpoint in another scheme is refused (``ValueError``)."""
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text()).get("quantization_config") or {}
    groups = list(config.get("config_groups", {}).values())
    if config.get("quant_method") != "compressed-tensors" or len(groups) != 1:
        raise ValueError(f"{model_dir}: not a one-group compressed-tensors checkpoint")
    weights, inputs = groups[0].get("weights") or {}, groups[0].get("input_activations") or {}
    scheme = (weights.get("num_bits"), weights.get("strategy"), weights.get("symmetric"), inputs.get("num_bits"))
    if scheme != (8, "channel", True, 8) or inputs.get("strategy") != "token" or not inputs.get("dynamic"):
        raise ValueError(f"{model_dir}: not int8 per-channel weights with dynamic per-token int8 activations")
    saturate = int8_saturates() if saturate is None else saturate
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    replaced = 0
    for name, module in model.named_modules():
        scale = tensors.get(f"{name}.weight_scale")
        if isinstance(module, torch.nn.Linear) and scale is not None:
            module.forward = _int8_linear(tensors[f"{name}.weight"], scale, bool(inputs["symmetric"]), saturate)  # type: ignore[method-assign,assignment]
            replaced += 1
    return replaced
