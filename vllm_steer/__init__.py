"""vllm-steer: per-request activation steering inside vLLM's batched forward pass.

Installing the package registers :func:`vllm_steer.engine.vllm.register` under vLLM's
``vllm.general_plugins`` entry point (name ``vllm_steer``), so every vLLM process (API server, engine
core, workers) patches itself on start, and :class:`vllm_steer.server.plugin.SteeringEndpointPlugin`
under ``vllm.endpoint_plugins``. Requests choose their steering with ``steer_*`` keys in
``SamplingParams.extra_args`` (``vllm_xargs`` over the OpenAI API); see :mod:`vllm_steer.core.request`.

Where things are (each subpackage imports only the ones below it):

* :mod:`vllm_steer.core` — the math, the profile format, per-request settings, the method and model-layout
  tables, the fingerprint, the plugin's settings, the keys server and engine exchange;
* :mod:`vllm_steer.data` — the shipped prompt sets and their loader;
* :mod:`vllm_steer.engine` — the runtime (slots, buffers, custom op), fused op, Triton kernel, vLLM glue;
* :mod:`vllm_steer.server` — tenant tiers, the policy middleware and routes, the endpoint plugin, Ray Serve;
* :mod:`vllm_steer.evaluation`, :mod:`vllm_steer.calibration` — ``vllm-steer eval`` and ``calibrate``;
* :mod:`vllm_steer.testing` — the Hugging Face reference and test helpers (tests and benchmarks only).
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
