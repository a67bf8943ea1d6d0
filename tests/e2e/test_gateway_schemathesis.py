"""schemathesis against the gateway's OpenAPI document, in front of the real dev vLLM: no 5xx,
no response outside the documented schemas, invalid input refused, auth enforced.

The token cap is 16 so generated requests stay cheap; another seed: CRUCIBLE_ST_SEED=7.
"""

import os
import re
import subprocess
from pathlib import Path

from tests.conftest import ROOT
from tests.processes import gateway, make_key


def test_schemathesis_finds_no_failure(tmp_path: Path, inference_url: str, redis_url: str) -> None:
    with gateway(tmp_path, [inference_url], redis_url, max_tokens_cap=16) as g:
        key = make_key(tmp_path, "fuzzer", rpm=0, admin=True)
        (tmp_path / "st").mkdir()
        run = subprocess.run(
            [
                str(ROOT / ".venv" / "bin" / "schemathesis"),
                "run",
                f"{g.url}/openapi.json",
                "-H",
                f"Authorization: Bearer {key}",
                "--checks",
                "all",
                "--max-examples",
                "30",
                "--seed",
                os.environ.get("CRUCIBLE_ST_SEED", "1"),
                "--no-color",
            ],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
            cwd=tmp_path / "st",  # it keeps a cache folder in its working directory
        )
        log = g.log.read_text()
    summary = re.search(r"(\d+) generated, (\d+) passed", run.stdout)
    assert run.returncode == 0 and summary, run.stdout[-4000:]
    generated, passed = int(summary[1]), int(summary[2])
    print(f"schemathesis: {generated} cases generated, {passed} passed")
    assert generated >= 300 and passed == generated
    assert "Traceback" not in log
