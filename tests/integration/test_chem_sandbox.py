"""The RDKit sandbox's worker processes, real ones: what they can reach of the agent's secrets."""

import asyncio
import time
from pathlib import Path

import pytest

from services.agent.tools.sandbox import ToolSandbox


def test_chemistry_workers_inherit_no_token_or_database_url(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A hostile SMILES that escaped RDKit must find no internal token or database URL."""
    monkeypatch.setenv("CRUCIBLE_INTERNAL_TOKEN", "canary-internal-token")
    monkeypatch.setenv("CRUCIBLE_AGENT_DATABASE_URL", "postgresql://u:canary-password@db/agent")

    def environ(pid: int) -> bytes:
        return Path(f"/proc/{pid}/environ").read_bytes()

    async def scenario() -> tuple[dict[str, object], list[bytes]]:
        sandbox = ToolSandbox(workers=1, timeout_s=30)
        await sandbox.start()
        try:
            result = await sandbox.call("molecule_info", {"smiles": "CCO"}, time.monotonic() + 30)
            return result, [environ(pid) for pid in sandbox.pids()]
        finally:
            await sandbox.close()

    result, environs = asyncio.run(scenario())
    assert result["formula"] == "C2H6O"  # the worker still works without them
    assert environs and all(b"PATH=" in env for env in environs)
    assert not any(b"canary" in env for env in environs)
