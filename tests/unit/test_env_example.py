"""`.env.example` lists every variable a service reads, so an operator can find each one."""

import pytest
from pydantic import AliasChoices

from services.agent.config import AgentSettings
from services.common.config import ServiceSettings
from services.finetune.config import FinetuneSettings
from services.gateway.config import GatewaySettings
from services.retrieval.config import RetrievalSettings
from tests.conftest import ROOT

DOCUMENTED = {
    line.split("=", 1)[0]
    for line in (ROOT / ".env.example").read_text().splitlines()
    if line and not line.startswith("#")
}


def _env_names(cls: type[ServiceSettings]) -> set[str]:
    prefix = cls.model_config.get("env_prefix", "")
    names = set()
    for name, field in cls.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            alias = alias.choices[0]
        names.add(alias if isinstance(alias, str) else f"{prefix}{name}".upper())
    return names


@pytest.mark.parametrize(
    "settings", [GatewaySettings, RetrievalSettings, FinetuneSettings, AgentSettings]
)
def test_every_setting_is_in_env_example(settings: type[ServiceSettings]) -> None:
    assert _env_names(settings) - DOCUMENTED == set()
