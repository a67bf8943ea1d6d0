"""Each benchmark runs at tiny size in the suite, so a broken benchmark is caught here."""

import json
from pathlib import Path

from bench import inference


def test_inference_bench_smoke_writes_positive_throughput(
    inference_url: str, tmp_path: Path
) -> None:
    out = tmp_path / "inference.json"
    assert inference.main(["--url", inference_url, "--smoke", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [lvl["concurrency"] for lvl in data["levels"]] == [1, 4]
    assert all(lvl["median_tokens_per_s"] > 0 for lvl in data["levels"])
