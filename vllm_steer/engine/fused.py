"""Which fused implementation runs the general steering op, and when it may compile.

The general op (:func:`vllm_steer.core.ops.token_deltas`) is what a CUDA graph captures at every hooked
site, so its launch count is the plugin's cost per decode step. Two fused versions of it:

* ``triton`` — one hand-written kernel (:mod:`vllm_steer.engine.kernels`), one launch per site; CUDA only;
* ``compiled`` — the torch op compiled by torch.compile (Inductor fuses it into a few kernels); any
  device (on CPU too, for tests).

Both compile on first use of a *kind* of call, and a compile inside a CUDA-graph capture would break
the capture. So each strategy says what a kind is, compiles outside captures (vLLM runs every batch
size eagerly before capturing it, and the runtime runs the fused op in those steps even when nothing
is steered), and inside a capture either replays compiled code or answers ``None``, and the runtime
captures the eager op instead (same result, slower, counted).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from vllm_steer.core.ops import token_deltas
from vllm_steer.core.settings import FusedChoice
from vllm_steer.engine import kernels

__all__ = ["FusedOp", "TritonOp", "CompiledOp", "choose_fused_op"]

Kind = tuple[object, ...]
"""What one compile covers (dtype, alignment, ...): a strategy's :meth:`FusedOp.kind` of ``h``."""


class FusedOp:
    """A fused general op; ``args`` are :func:`token_deltas`'s, ``h`` first."""

    name = "?"

    def __init__(self) -> None:
        self._seen: set[Kind] = set()

    def kind(self, h: torch.Tensor) -> Kind:
        raise NotImplementedError

    def seen(self, h: torch.Tensor) -> bool:
        return self.kind(h) in self._seen

    @property
    def kinds(self) -> frozenset[Kind]:
        return frozenset(self._seen)

    def run(self, args: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Outside a capture: compiles if this kind is new."""
        out = self._call(args)
        self._seen.add(self.kind(args[0]))
        return out

    def in_capture(self, args: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
        """Inside a capture: compiled code for this call, or ``None`` if there is none (never compiles)."""
        return self._call(args) if self.seen(args[0]) else None

    def _call(self, args: tuple[torch.Tensor, ...]) -> torch.Tensor:
        raise NotImplementedError


class TritonOp(FusedOp):
    """One Triton kernel per site. Triton compiles per dtype and per alignment of ``h`` (the tables'
    pointers are not specialized on alignment), which is exactly the kind."""

    name = "triton"

    def kind(self, h: torch.Tensor) -> Kind:
        return (h.dtype, h.data_ptr() % 16 == 0, h.stride(0) % 16 == 0)

    def _call(self, args: tuple[torch.Tensor, ...]) -> torch.Tensor:
        h = args[0]
        if h.dtype not in kernels.DTYPES or h.stride(-1) != 1:  # float64 keeps its precision; odd layouts
            return token_deltas(*args)
        return kernels.token_deltas_triton(*args)


class CompiledOp(FusedOp):
    """``token_deltas`` compiled by torch.compile, dynamic in the token count.

    Dynamo guards on dtype, on N == 1 (it specializes it) and on the dispatch keys a call sees (vLLM's
    inference tensors lack autograd keys; a compiled caller's first run excludes them); inside a
    capture, Dynamo's own guards decide (``fail_on_recompile``), so an unseen variant never compiles.
    """

    name = "compiled"
    _compiled: Callable[..., torch.Tensor] | None = None  # one per process: Dynamo caches per code object and wrapper

    @classmethod
    def _fn(cls) -> Callable[..., torch.Tensor]:
        if cls._compiled is None:
            cls._compiled = torch.compile(token_deltas, fullgraph=True)
        return cls._compiled

    def kind(self, h: torch.Tensor) -> Kind:
        excluded = torch._C._dispatch_tls_is_dispatch_key_excluded(torch._C.DispatchKey.ADInplaceOrView)
        return (h.dtype, h.shape[0] == 1, h.is_inference(), excluded)

    def _call(self, args: tuple[torch.Tensor, ...]) -> torch.Tensor:
        if args[0].shape[0] > 1:
            for i in (0, 5, 6, 7, 8):  # h and the per-token tables, [N, ...]: one compile for every N ≥ 2
                torch._dynamo.maybe_mark_dynamic(args[i], 0)
        return self._fn()(*args)

    def in_capture(self, args: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
        try:
            with torch.compiler.set_stance("fail_on_recompile"):
                return self._fn()(*args)
        except RuntimeError as exc:
            if "fail_on_recompile" not in str(exc):
                raise
            return None


def choose_fused_op(choice: FusedChoice | bool | None, device: torch.device, hidden_size: int) -> FusedOp | None:
    """The fused op for this runtime: ``auto`` (or None) = the best this device has on CUDA — Triton where
    it runs, else compiled — and none on CPU (there the per-method short paths are as cheap and a compile
    only slows the start); ``True`` = the best this device has, on CPU too."""
    if choice is None or choice == "auto":
        choice = device.type == "cuda"
    if choice is False or choice == "off":
        return None
    triton_ok = device.type == "cuda" and kernels.available() and hidden_size <= kernels.MAX_HIDDEN
    if choice is True:
        return TritonOp() if triton_ok else CompiledOp()
    if choice == "triton":
        if not triton_ok:
            raise ValueError(
                "fused_op 'triton' needs a CUDA device, Triton, and a hidden size up to "
                f"{kernels.MAX_HIDDEN} (this: {device}, {hidden_size})"
            )
        return TritonOp()
    if choice == "compiled":
        return CompiledOp()
    raise ValueError(f"fused_op must be auto, off, triton or compiled, not {choice!r}")
