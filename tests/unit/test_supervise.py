"""The monitor's bookkeeping (services/supervise.py) and which settings reach which service."""

import signal
import subprocess
from pathlib import Path

from services.stack import Stack, StackConfig
from services.stackconfig import _settings_for
from services.supervise import Ledger, Policy, probe


def test_restarts_are_counted_by_reason_and_a_start_by_hand_is_not_one() -> None:
    ledger = Ledger(Policy())
    ledger.event("gateway", "STARTING", "STOPPED", now=0)  # make up
    ledger.event("gateway", "EXITED", "RUNNING", now=10)
    ledger.event("gateway", "STARTING", "EXITED", now=10)
    ledger.killed_unhealthy.add("gateway")
    ledger.event("gateway", "EXITED", "RUNNING", now=60)
    ledger.event("gateway", "STARTING", "EXITED", now=60)
    ledger.event("gateway", "STARTING", "BACKOFF", now=70)  # a failed start, tried again
    assert ledger.restarts == {"gateway": {"exited": 2, "unhealthy": 1}}
    assert ledger.total("gateway") == 3 and not ledger.failed


def test_a_service_that_keeps_exiting_after_its_start_is_stopped_and_failed() -> None:
    ledger = Ledger(Policy(crash_exits=3, crash_window_s=60))
    actions = [ledger.event("agent", "EXITED", "RUNNING", now=t) for t in (0, 100, 200, 210)]
    assert actions == [None, None, None, None]  # spread out: not a loop
    assert ledger.event("agent", "EXITED", "RUNNING", now=220) == "stop"  # 3 in 20 s
    assert "exited 3 times in 60 s" in ledger.failed["agent"]
    ledger.event("agent", "STARTING", "STOPPED", now=300)  # make up gives it a fresh chance
    assert "agent" not in ledger.failed
    assert ledger.event("agent", "EXITED", "RUNNING", now=310) is None


def test_supervisord_giving_up_is_a_failure() -> None:
    ledger = Ledger(Policy())
    ledger.event("inference", "FATAL", "BACKOFF", now=0)
    assert "supervisord gave up" in ledger.failed["inference"]


def test_a_service_gets_its_own_and_the_shared_settings_only() -> None:
    env = {
        "CRUCIBLE_AGENT_CHEM_WORKERS": "4",
        "CRUCIBLE_FINETUNE_WORKER_ALIVE_S": "6",
        "CRUCIBLE_INTERNAL_TOKEN": "t",
    }
    assert _settings_for("agent", env) == {
        "CRUCIBLE_AGENT_CHEM_WORKERS": "4",
        "CRUCIBLE_INTERNAL_TOKEN": "t",
    }
    assert _settings_for("finetune-worker", env) == {
        "CRUCIBLE_FINETUNE_WORKER_ALIVE_S": "6",
        "CRUCIBLE_INTERNAL_TOKEN": "t",
    }
    assert _settings_for("inference", env) == {"CRUCIBLE_INTERNAL_TOKEN": "t"}


def test_probe_says_no_for_a_closed_port_and_a_bad_target() -> None:
    assert probe("tcp://127.0.0.1:1", 1) is False
    assert probe("http://127.0.0.1:1/health", 1) is False
    assert probe("redis://127.0.0.1:1", 1) is False


def test_down_stops_a_stack_started_before_supervision(tmp_path: Path) -> None:
    """A `make up` of the previous version left var/run/<name>.pid; the new `make down` must
    still stop it, or the upgrade leaves the ports taken."""
    old = subprocess.Popen(["sleep", "300"], start_new_session=True)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "gateway.pid").write_text(str(old.pid))
    assert Stack(StackConfig(var_dir=tmp_path)).down() == ["gateway"]
    assert old.wait(5) == -signal.SIGTERM
    assert not (tmp_path / "run" / "gateway.pid").exists()
