"""`.env.example` lists every variable a service reads, so an operator can find each one."""

from services.common.config import ServiceSettings
from services.gateway.config import GatewaySettings
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
        names.add(alias if isinstance(alias, str) else f"{prefix}{name}".upper())
    return names


def test_every_gateway_setting_is_in_env_example() -> None:
    assert _env_names(GatewaySettings) - DOCUMENTED == set()
