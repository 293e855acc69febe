"""Config files, the provider override, and the errors that name the bad field and file."""

from __future__ import annotations

from pathlib import Path

import pytest

import sandbay
from sandbay._config import parse_config

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_are_the_local_provider(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SANDBAY_PROVIDER", raising=False)
    monkeypatch.delenv("SANDBAY_CONFIG", raising=False)
    config = sandbay.load_config()
    assert config.provider.type == "local"
    assert config.spec == sandbay.SandboxSpec()


def test_file_in_cwd_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SANDBAY_PROVIDER", raising=False)
    (tmp_path / "sandbay.toml").write_text(
        '[provider]\ntype = "docker"\nimage = "img:1"\n[spec]\nmemory_mb = 512\n'
    )
    config = sandbay.load_config()
    assert isinstance(config.provider, sandbay.DockerConfig)
    assert config.provider.image == "img:1"
    assert config.spec.memory_mb == 512


def test_env_override_swaps_the_provider(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    file = tmp_path / "c.toml"
    file.write_text('[provider]\ntype = "docker"\nimage = "img:1"\n')
    monkeypatch.setenv("SANDBAY_PROVIDER", "local")
    config = sandbay.load_config(file)
    assert isinstance(config.provider, sandbay.LocalConfig)


def test_invalid_field_names_field_and_file(tmp_path: Path) -> None:
    file = tmp_path / "bad.toml"
    file.write_text('[provider]\ntype = "docker"\nimgae = "x"\n')
    with pytest.raises(sandbay.ConfigError, match=r"bad\.toml.*provider\.docker\.imgae"):
        sandbay.load_config(file)


def test_bad_value_names_field(tmp_path: Path) -> None:
    file = tmp_path / "bad.toml"
    file.write_text("[spec]\nmemory_mb = -5\n")
    with pytest.raises(sandbay.ConfigError, match=r"spec\.memory_mb"):
        sandbay.load_config(file)


def test_unknown_type_lists_valid(tmp_path: Path) -> None:
    file = tmp_path / "bad.toml"
    file.write_text('[provider]\ntype = "kubernetes-ish"\n')
    with pytest.raises(sandbay.ConfigError, match="valid providers: docker, local"):
        sandbay.load_config(file)


def test_missing_file_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(sandbay.ConfigError, match="does not exist"):
        sandbay.load_config(tmp_path / "nope.toml")
    (tmp_path / "x.toml").write_text("[provider\n")
    with pytest.raises(sandbay.ConfigError, match="not valid TOML"):
        sandbay.load_config(tmp_path / "x.toml")


@pytest.mark.parametrize(
    "profile", sorted((ROOT / "providers").glob("*.toml")), ids=lambda p: p.name
)
def test_shipped_profiles_are_valid(profile: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SANDBAY_PROVIDER", raising=False)
    config = sandbay.load_config(profile)
    assert config.provider.type == profile.stem


def test_profiles_differ_from_each_other_only_by_provider_table() -> None:
    profiles = sorted((ROOT / "providers").glob("*.toml"))
    assert {p.stem for p in profiles} >= {"docker", "local"}


def test_config_models_are_frozen() -> None:
    config = parse_config({"provider": {"type": "local"}})
    assert isinstance(config.provider, sandbay.LocalConfig)
    with pytest.raises(ValueError, match="frozen"):
        config.provider.isolate = True
