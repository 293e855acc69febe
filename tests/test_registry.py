"""The provider registry: config models name their providers; others plug in by entry point."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr

import sandbay
from sandbay._config import ENTRY_POINT_GROUP, builtin_config_types, parse_config
from sandbay._provider import make_provider, provider_names

pytestmark = pytest.mark.anyio

TESTS = Path(__file__).parent


def write_distribution(where: Path, value: str = "thirdparty_provider:ThirdPartyConfig") -> None:
    """An installed distribution as importlib.metadata reads one: a dist-info on sys.path."""
    info = where / "sandbay_thirdparty-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: sandbay-thirdparty\nVersion: 0.1\n"
    )
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\nthirdparty = {value}\n")


@pytest.fixture
def thirdparty(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    site = tmp_path / "site"
    write_distribution(site)
    monkeypatch.syspath_prepend(str(TESTS))  # where the provider's module is
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delenv("SANDBAY_PROVIDER", raising=False)
    monkeypatch.delenv("SANDBAY_CONFIG", raising=False)
    yield tmp_path


def test_provider_names_come_from_the_config_union() -> None:
    assert set(builtin_config_types()) == {"local", "docker", "daytona", "e2b", "modal"}
    assert builtin_config_types()["docker"] is sandbay.DockerConfig
    assert builtin_config_types()["e2b"] is sandbay.E2BConfig
    assert {"local", "docker"} <= set(provider_names())


def test_an_entry_point_adds_a_provider(thirdparty: Path) -> None:
    found = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    assert [ep.name for ep in found] == ["thirdparty"]  # really through importlib.metadata
    assert provider_names() == ["daytona", "docker", "e2b", "local", "modal", "thirdparty"]
    valid = "valid providers: daytona, docker, e2b, local, modal, thirdparty"
    with pytest.raises(sandbay.ConfigError, match=valid):
        parse_config({"provider": {"type": "nope"}})


def test_a_config_file_naming_a_thirdparty_type_validates_with_its_model(
    thirdparty: Path,
) -> None:
    from thirdparty_provider import ThirdPartyConfig

    file = thirdparty / "sandbay.toml"
    file.write_text(f'[provider]\ntype = "thirdparty"\ntoken = "s3cret"\nroot = "{thirdparty}"\n')
    config = sandbay.load_config(file)
    assert isinstance(config.provider, ThirdPartyConfig)
    assert config.provider.token.get_secret_value() == "s3cret"
    assert config.provider.root == thirdparty

    file.write_text('[provider]\ntype = "thirdparty"\ntokn = "typo"\n')
    with pytest.raises(sandbay.ConfigError, match=r"provider\.tokn: Extra inputs"):
        sandbay.load_config(file)
    file.write_text('[provider]\ntype = "thirdparty"\nroot = 5\n')
    with pytest.raises(sandbay.ConfigError, match=r"provider\.root"):
        sandbay.load_config(file)


def test_sandbay_provider_may_name_a_thirdparty_provider(
    thirdparty: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from thirdparty_provider import ThirdPartyConfig, ThirdPartyProvider

    monkeypatch.setenv("SANDBAY_PROVIDER", "thirdparty")
    assert isinstance(sandbay.load_config().provider, ThirdPartyConfig)
    assert isinstance(make_provider(ThirdPartyConfig()), ThirdPartyProvider)


async def test_a_thirdparty_provider_opens_sandboxes_and_is_closed(thirdparty: Path) -> None:
    from thirdparty_provider import ThirdPartyConfig, ThirdPartyProvider

    config = ThirdPartyConfig(root=thirdparty)
    async with sandbay.Providers() as providers:
        provider = providers.get(config)
        assert isinstance(provider, ThirdPartyProvider)
        async with providers.open_sandbox(config) as sb:
            assert (await sb.exec("echo from-thirdparty")).text == "from-thirdparty\n"
        assert providers.get("thirdparty") is not provider  # another config: the defaults
        assert not provider.closed
    assert provider.closed
    with pytest.raises(sandbay.ConfigError, match="closed"):
        providers.get(config)


async def test_configs_differing_only_in_a_secret_never_share_a_provider(
    thirdparty: Path,
) -> None:
    from thirdparty_provider import ThirdPartyConfig

    tenant_a = ThirdPartyConfig(token=SecretStr("a-key"))
    tenant_b = ThirdPartyConfig(token=SecretStr("b-key"))
    same_as_a = ThirdPartyConfig(token=SecretStr("a-key"))
    assert tenant_a.model_dump_json() == tenant_b.model_dump_json()  # serialise alike
    async with sandbay.Providers() as providers:
        assert providers.get(tenant_a) is not providers.get(tenant_b)
        assert providers.get(tenant_a) is providers.get(same_as_a)
    # The process-wide Providers behind get_provider keys the same way.
    assert sandbay.get_provider(tenant_a) is not sandbay.get_provider(tenant_b)
    assert sandbay.get_provider(tenant_a) is sandbay.get_provider(same_as_a)


def test_public_data_leaves_secrets_out(thirdparty: Path) -> None:
    from thirdparty_provider import ThirdPartyConfig

    data = ThirdPartyConfig(token=SecretStr("s3cret"), root=thirdparty).public_data()
    assert data == {"type": "thirdparty", "root": str(thirdparty)}
    assert sandbay.DockerConfig(image="x:1").public_data()["image"] == "x:1"


def test_an_entry_point_that_names_no_config_model_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_distribution(tmp_path, value="os:path")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(sandbay.ConfigError, match="must name a BaseProviderConfig subclass"):
        parse_config({"provider": {"type": "thirdparty"}})


def test_config_does_not_import_the_provider_module() -> None:
    code = (
        "import sys, sandbay._config as c\n"
        "c.parse_config({'provider': {'type': 'docker'}})\n"
        "c.load_config()\n"
        "print(sorted(m for m in sys.modules if m.startswith('sandbay.')))\n"
    )
    env = {**os.environ}
    env.pop("SANDBAY_PROVIDER", None)
    env.pop("SANDBAY_CONFIG", None)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    ).stdout
    assert "sandbay._provider" not in out
    assert "sandbay.providers" not in out
    assert "import _provider" not in (Path(sandbay.__file__).parent / "_config.py").read_text()
    assert "from ._provider" not in (Path(sandbay.__file__).parent / "_config.py").read_text()


def test_the_cli_lists_a_thirdparty_provider(thirdparty: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(thirdparty / "site"), str(TESTS)])}
    env.pop("SANDBAY_PROVIDER", None)
    result = subprocess.run(
        [sys.executable, "-m", "sandbay", "providers"],
        capture_output=True,
        text=True,
        env=env,
        cwd=thirdparty,
    )
    assert "thirdparty" in result.stdout, result.stdout + result.stderr
    assert "a test provider" in result.stdout


def test_a_whole_config_round_trips_through_json_with_its_provider_fields(
    thirdparty: Path,
) -> None:
    from thirdparty_provider import ThirdPartyConfig

    for provider in (
        sandbay.LocalConfig(isolate=False, root=thirdparty),
        sandbay.DockerConfig(image="img:1", cpu=2),
        ThirdPartyConfig(root=thirdparty),
    ):
        config = sandbay.SandbayConfig(provider=provider)
        assert sandbay.SandbayConfig.model_validate_json(config.model_dump_json()) == config


def test_the_process_wide_providers_are_closed_at_exit(thirdparty: Path) -> None:
    code = (
        "import atexit, sandbay\n"
        "from thirdparty_provider import ThirdPartyConfig\n"
        "made = []\n"
        "atexit.register(lambda: print('closed:', made[0].closed))  # runs after sandbay's\n"
        "made.append(sandbay.get_provider(ThirdPartyConfig()))\n"
        "print('open:', made[0].closed)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(thirdparty / "site"), str(TESTS)])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.stdout.split() == ["open:", "False", "closed:", "True"], result.stderr
