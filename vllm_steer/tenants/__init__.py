"""The old name of the API-key command: ``python -m vllm_steer.tenants hash-key | new-key`` still works.

The tenant policy lives in :mod:`vllm_steer.server.tenants`; prefer ``python -m vllm_steer.server.tenants``.
This package holds only the entry point (``__main__``), which runs that command.
"""
