"""Every shipped profile, GPU ones included, is accepted by the pinned vLLM's own parser.

The GPU profiles cannot start here, so this is what catches a typo or a flag that the pinned
version renamed before a lab's long launch does.
"""

import json
import subprocess
from pathlib import Path

from services.inference import profiles
from tests.conftest import ROOT

ENGINE_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"


def _verdicts(argvs: list[list[str]]) -> list[dict[str, object]]:
    out = subprocess.run(
        [str(ENGINE_PYTHON), str(Path(__file__).with_name("vllm_argcheck.py"))],
        input="".join(json.dumps(a) + "\n" for a in argvs),
        capture_output=True,
        text=True,
        timeout=180,
        check=True,
    ).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def test_all_profiles_parse_and_a_typo_is_caught() -> None:
    names = profiles.available()
    argvs = [
        profiles.load(n).command("py", host="127.0.0.1", port=8000, models_dir=Path("/m"))[3:]
        for n in names
    ]
    argvs.append(["--model", "/m/x", "--enable-lorra"])
    verdicts = _verdicts(argvs)
    assert len(verdicts) == len(argvs)
    for name, verdict in zip(names, verdicts, strict=False):
        assert verdict["ok"], f"{name}: {verdict}"
    assert not verdicts[-1]["ok"] and "enable-lorra" in str(verdicts[-1]["error"])
