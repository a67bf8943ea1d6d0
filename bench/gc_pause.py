"""How long a full garbage collection stops the retrieval service, with and without freezing
what its startup loaded (what `services/common/app.py` does after every service's startup).

    python bench/gc_pause.py [--rounds 7] [--out FILE]

In one process holding what the retrieval service holds after startup (its app module, the
torch embedding model, the fp32 ONNX model for queries), it alternates: unfrozen, time
`gc.collect()`; frozen (`gc.freeze()`), time it again. Every Python thread of the process stops
for as long as a collection runs.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._load import write_result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)

    import services.retrieval.app  # noqa: F401  (everything the service imports)
    from services.retrieval.embedder import Embedder

    with tempfile.TemporaryDirectory(prefix="crucible-bench-") as tmp:
        embedder = Embedder(backend="torch", small_onnx_dir=Path(tmp) / "onnx-fp32")
        deadline = time.monotonic() + 300
        while not embedder.small_calls_on_onnx and time.monotonic() < deadline:
            time.sleep(0.2)
        embedder.encode(["warm up", "the models"])
        embedder.encode(["one query"])
        times: dict[str, list[float]] = {"unfrozen": [], "frozen": []}
        tracked = {}
        for _ in range(args.rounds):
            for state in times:
                gc.unfreeze() if state == "unfrozen" else gc.freeze()
                tracked[state] = len(gc.get_objects())
                t = time.perf_counter()
                gc.collect()
                times[state].append((time.perf_counter() - t) * 1000)
    result = {
        "rounds": args.rounds,
        "objects_tracked": tracked,
        "full_collection_ms": {k: [round(x, 2) for x in v] for k, v in times.items()},
        "median_ms": {k: round(statistics.median(v), 2) for k, v in times.items()},
    }
    path = write_result("gc_pause", result, args.out)
    print(result["median_ms"], result["objects_tracked"])
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
