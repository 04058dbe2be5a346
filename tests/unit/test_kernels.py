"""The Triton kernel against the torch op, in Triton's interpreter on the CPU (the GPU box runs the
same check compiled: tests/gpu/test_cuda.py). The interpreter executes the kernel's own code, program by
program, so its formulas, masks and the exact zeros of untouched rows are checked without a GPU."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from support import REPO, TESTS
from support.ops import random_tables
from vllm_steer.core.ops import token_deltas
from vllm_steer.engine.fused import TritonOp, choose_fused_op


def test_kernel_equals_the_torch_op_in_the_interpreter():
    pytest.importorskip("triton")
    path = [str(REPO), os.environ.get("PYTHONPATH", "")]  # the package, installed or not (kernel_check finds support/)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(path)}
    proc = subprocess.run(
        [sys.executable, str(TESTS / "gpu" / "kernel_check.py"), "cpu"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "108 cases passed" in proc.stdout


def test_the_kernel_is_chosen_only_where_it_runs():
    assert choose_fused_op("auto", torch.device("cpu"), 64) is None
    assert choose_fused_op(None, torch.device("cpu"), 64) is None
    assert choose_fused_op(True, torch.device("cpu"), 64).name == "compiled"
    assert choose_fused_op("off", torch.device("cpu"), 64) is None
    with pytest.raises(ValueError, match="needs a CUDA device"):
        choose_fused_op("triton", torch.device("cpu"), 64)
    with pytest.raises(ValueError, match="auto, off, triton or compiled"):
        choose_fused_op("fast", torch.device("cpu"), 64)


def test_the_fused_op_setting_is_validated_naming_the_field(monkeypatch):
    from vllm_steer.core.settings import ConfigError, SteerConfig

    assert SteerConfig.resolve(None).fused_op == "auto"
    monkeypatch.setenv("VLLM_STEER_FUSED_OP", "triton")
    assert SteerConfig.resolve(None).fused_op == "triton"
    assert SteerConfig.resolve({"vllm_steer": {"fused_op": "off"}}).fused_op == "off"  # additional_config wins
    monkeypatch.setenv("VLLM_STEER_FUSED_OP", "fast")
    with pytest.raises(ConfigError, match="fused_op"):
        SteerConfig.resolve(None)


def test_the_triton_op_leaves_what_the_kernel_does_not_take_to_the_torch_op():
    """float64 keeps its precision and a column-strided h its layout: the torch op serves them (no error
    inside an engine step), here on the CPU, where no kernel could run."""
    bases, methods, gains, thresholds, token_slot, _, c, s, scale = random_tables(
        16, 5, 2, torch.Generator().manual_seed(0), torch.float32
    )
    for h in (torch.randn(5, 16, dtype=torch.float64), torch.randn(16, 5).t()):
        args = (h, bases, methods, gains, thresholds, token_slot, c, s, scale)
        assert torch.equal(TritonOp().run(args), token_deltas(*args))
