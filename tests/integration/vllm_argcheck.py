"""Run by the engine venv's Python: parse each argv (one JSON list per line on stdin) with the
pinned vLLM's own server argument parser, and print one verdict per line."""

import json
import sys

from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
from vllm.utils.argparse_utils import FlexibleArgumentParser


class _Refused(Exception):
    pass


class _Parser(FlexibleArgumentParser):
    def error(self, message: str) -> None:
        raise _Refused(message)


for line in sys.stdin:
    argv = json.loads(line)
    try:
        validate_parsed_serve_args(make_arg_parser(_Parser()).parse_args(argv))
        print(json.dumps({"ok": True}), flush=True)
    except (_Refused, Exception) as exc:
        print(json.dumps({"ok": False, "error": str(exc)[:300]}), flush=True)
