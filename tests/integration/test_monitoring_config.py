"""Prometheus's own tools on the shipped config and rules, and the dashboards as files."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.stack import Ports, StackConfig
from tests.conftest import ROOT

PROM = ROOT / "deploy" / "prometheus"
GRAFANA = ROOT / "deploy" / "grafana"


def promtool(*args: str) -> str:
    exe = shutil.which("promtool")
    assert exe, "promtool is missing: `make setup` installs Debian's prometheus package"
    done = subprocess.run([exe, *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_promtool_accepts_the_compose_and_the_native_configs(tmp_path: Path) -> None:
    assert "SUCCESS" in promtool("check", "config", str(PROM / "prometheus.yml"))
    native = StackConfig(var_dir=tmp_path, ports=Ports()).write_prometheus_config()
    assert "SUCCESS" in promtool("check", "config", str(native))


def test_promtool_accepts_the_rules_and_every_alert_has_a_unit_test() -> None:
    out = promtool("check", "rules", str(PROM / "alerts.yml"), str(PROM / "gpu-alerts.yml"))
    assert "17 rules found" in out and "1 rules found" in out
    alerts = {
        rule["alert"]
        for f in ("alerts.yml", "gpu-alerts.yml")
        for group in yaml.safe_load((PROM / f).read_text())["groups"]
        for rule in group["rules"]
    }
    tests = yaml.safe_load((PROM / "tests" / "alerts_test.yml").read_text())["tests"]
    cases = [case for t in tests for case in t["alert_rule_test"]]
    fired = {c["alertname"] for c in cases if c.get("exp_alerts")}
    quiet = {c["alertname"] for c in cases if not c.get("exp_alerts")}
    assert alerts == fired == quiet  # each fires on its fault and stays quiet without it


def test_every_alert_behaves_as_its_unit_test_says() -> None:
    assert "SUCCESS" in promtool("test", "rules", str(PROM / "tests" / "alerts_test.yml"))


def _build() -> Any:
    spec = importlib.util.spec_from_file_location("grafana_build", GRAFANA / "build.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dashboards() -> dict[str, dict[str, Any]]:
    return {
        p.name: json.loads(p.read_text()) for p in sorted((GRAFANA / "dashboards").glob("*.json"))
    }


def test_dashboard_files_are_what_the_builder_writes() -> None:
    rendered = _build().render()
    on_disk = {p.name: p.read_text() for p in (GRAFANA / "dashboards").glob("*.json")}
    assert on_disk == rendered, "run: python deploy/grafana/build.py"


@pytest.mark.parametrize("name", sorted(dashboards()))
def test_dashboards_are_grafana_json_on_the_fixed_data_source(name: str) -> None:
    board = dashboards()[name]
    provisioned = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
    uid = provisioned["datasources"][0]["uid"]
    assert board["uid"].startswith("crucible-") and board["title"] and board["schemaVersion"]
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)) >= 4
    for panel in board["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": uid}
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == uid and target["expr"].strip()
