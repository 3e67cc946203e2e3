"""The command line for the interoperability test and for shell use:

    python -m keybroker encrypt [--context k=v ...] < plaintext > envelope
    python -m keybroker decrypt [--context k=v ...] < envelope > plaintext

Raw bytes on standard input and output; the broker and credentials come from the environment:
KEYBROKER_URL, KEYBROKER_CLIENT_ID, KEYBROKER_CLIENT_SECRET and (optional) KEYBROKER_CA_FILE.
Exit status 0 on success, 1 when the broker or the envelope refuses, 2 on wrong usage.
"""

import argparse
import os
import sys
from typing import Dict, List, Optional

from .client import Client
from .errors import KeybrokerError


def _context(pairs: List[str]) -> Dict[str, str]:
    context: Dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--context takes key=value, not {pair!r}")
        if key in context:
            raise ValueError(f"--context names {key!r} twice")
        context[key] = value
    return context


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m keybroker",
        description="Envelope encryption with keybroker data keys (stdin to stdout).",
    )
    parser.add_argument("command", choices=["encrypt", "decrypt"])
    parser.add_argument(
        "--context",
        action="extend",
        nargs="+",
        default=[],
        metavar="K=V",
        help="an encryption-context entry (repeatable)",
    )
    args = parser.parse_args(argv)
    try:
        context = _context(args.context)
    except ValueError as e:
        parser.error(str(e))
    missing = [
        name
        for name in ("KEYBROKER_URL", "KEYBROKER_CLIENT_ID", "KEYBROKER_CLIENT_SECRET")
        if not os.environ.get(name)
    ]
    if missing:
        parser.error("set " + ", ".join(missing))
    data = sys.stdin.buffer.read()
    try:
        with Client(
            os.environ["KEYBROKER_URL"],
            os.environ["KEYBROKER_CLIENT_ID"],
            os.environ["KEYBROKER_CLIENT_SECRET"],
            os.environ.get("KEYBROKER_CA_FILE") or None,
        ) as client:
            if args.command == "encrypt":
                out = client.encrypt(data, context)
            else:
                out = client.decrypt(data, context)
    except KeybrokerError as e:
        print(f"keybroker {args.command}: {e}", file=sys.stderr)
        return 1
    sys.stdout.buffer.write(out)
    sys.stdout.buffer.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
