"""Parses one file in its own process (`parsing.parse_file`): PDF and HTML parsers are large,
and a hostile document can make them spin or allocate without bound, so they never run in the
service's process. Usage: `parseworker EXT PATH MEMORY_MB`; the text goes to stdout, a reason to
stderr with a non-zero status (`rlimits.OUT_OF_MEMORY` when the cap was reached)."""

from __future__ import annotations

import sys
from pathlib import Path

from services.common.rlimits import OUT_OF_MEMORY, cap_memory
from services.retrieval.extract import extract_text, preload


def main() -> None:
    ext, path, memory_mb = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    preload(ext)  # the parser's own code is not counted against the document's budget
    data = path.read_bytes()
    cap_memory(memory_mb)
    try:
        text = extract_text(f"file{ext}", data)
    except MemoryError:
        del data
        sys.exit(OUT_OF_MEMORY)
    except Exception as exc:  # anything the parser throws is the document's problem
        sys.stderr.write(f"{type(exc).__name__}: {exc}"[:300])
        sys.exit(2)
    sys.stdout.buffer.write(text.encode("utf-8", "surrogatepass"))


if __name__ == "__main__":
    main()
