"""``python -m vllm_steer.server.tenants hash-key | new-key``: API keys for a tenants file.

(``python -m vllm_steer.tenants`` is the same command under its old name.)
"""

from __future__ import annotations

import argparse
import getpass
import sys

from vllm_steer.server.tenants.keys import generate_api_key, hash_api_key

__all__ = ["main"]

PROG = "python -m vllm_steer.server.tenants"


def _read_key_from_user() -> str:
    if sys.stdin.isatty():
        return getpass.getpass("API key (not echoed): ")
    return sys.stdin.readline().strip()


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    """``hash-key`` (key on stdin, never in argv) or ``new-key`` (a fresh key and its hash)."""
    parser = argparse.ArgumentParser(prog=prog, description="API keys for a tenants file")
    parser.add_argument("command", choices=["hash-key", "new-key"])
    args = parser.parse_args(argv)
    if args.command == "new-key":
        key = generate_api_key()
        print(f"key (give to the tenant, store nowhere): {key}")
    else:
        key = _read_key_from_user()
        if not key:
            parser.error("no key given on stdin")
    print(f"key_hash: {hash_api_key(key)}")
    return 0
