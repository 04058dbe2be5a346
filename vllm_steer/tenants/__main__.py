"""``python -m vllm_steer.tenants``: the old name of ``python -m vllm_steer.server.tenants``."""

import sys

from vllm_steer.server.tenants.cli import main

sys.exit(main(prog="python -m vllm_steer.tenants"))
