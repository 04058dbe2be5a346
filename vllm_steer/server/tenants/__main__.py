"""``python -m vllm_steer.server.tenants hash-key | new-key``."""

import sys

from vllm_steer.server.tenants.cli import main

sys.exit(main())
