"""Compose and the native stack run the same commands with the same variables."""

import re
from pathlib import Path

import yaml

from services.stack import StackConfig
from tests.conftest import ROOT

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_each_native_service_runs_the_same_module_with_the_same_variables_in_compose() -> None:
    for svc in StackConfig().services():
        spec = COMPOSE["services"][svc.name]
        assert spec["command"][1:] == svc.argv[1:], svc.name  # argv[0] is the local python
        assert set(spec["environment"]) - {"HF_TOKEN"} == set(svc.env), svc.name


def test_every_service_has_a_healthcheck_and_a_restart_policy() -> None:
    for name, spec in COMPOSE["services"].items():
        assert spec.get("healthcheck", {}).get("test"), name
        assert spec.get("restart") == "unless-stopped", name


def test_base_images_are_pinned_to_a_version() -> None:
    for dockerfile in (ROOT / "services").glob("*/Dockerfile"):
        for line in dockerfile.read_text().splitlines():
            if line.startswith("FROM "):
                assert re.search(r":v?\d+\.\d+", line) and ":latest" not in line, dockerfile


def test_inference_reserves_gpus_and_stays_on_the_internal_network() -> None:
    inference = COMPOSE["services"]["inference"]
    devices = inference["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert "ports" not in inference
    assert COMPOSE["networks"]["backend"]["internal"] is True
    assert Path(ROOT / inference["build"]["dockerfile"]).exists()
