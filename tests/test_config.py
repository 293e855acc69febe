"""Config files, the provider override, and the errors that name the bad field and file."""

from __future__ import annotations

import json
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
    with pytest.raises(
        sandbay.ConfigError, match="valid providers: daytona, docker, e2b, local, modal"
    ):
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


SPEC_TOML = """\
[provider]
type = "local"

[spec]
env = { SANDBAY_TEST_FROM = "the-config-file" }
labels = { origin = "sandbay-toml" }
"""


@pytest.fixture
def config_in_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A ``sandbay.toml`` with a ``[spec]`` in a fresh working directory."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SANDBAY_PROVIDER", raising=False)
    monkeypatch.delenv("SANDBAY_CONFIG", raising=False)
    file = tmp_path / "sandbay.toml"
    file.write_text(SPEC_TOML)
    return file


async def _spec_seen_by(sb: sandbay.Sandbox) -> tuple[str, dict[str, str]]:
    env = (await sb.exec(["sh", "-c", 'printf %s "$SANDBAY_TEST_FROM"'])).text
    [info] = [i for i in await sandbay.get_provider("local").list() if i.id == sb.id]
    return env, dict(info.labels)


@pytest.mark.anyio
async def test_config_file_spec_applies_without_a_provider(config_in_cwd: Path) -> None:
    async with sandbay.open_sandbox() as sb:
        env, labels = await _spec_seen_by(sb)
    assert env == "the-config-file"
    assert labels["origin"] == "sandbay-toml"


@pytest.mark.anyio
async def test_config_spec_applies_with_a_sandbay_config(tmp_path: Path) -> None:
    file = tmp_path / "elsewhere.toml"
    file.write_text(SPEC_TOML)
    async with sandbay.open_sandbox(sandbay.load_config(file)) as sb:
        env, labels = await _spec_seen_by(sb)
    assert env == "the-config-file"
    assert labels["origin"] == "sandbay-toml"


@pytest.mark.anyio
async def test_config_file_spec_applies_from_sandbay_config_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SANDBAY_PROVIDER", raising=False)
    file = tmp_path / "named.toml"
    file.write_text(SPEC_TOML)
    monkeypatch.setenv("SANDBAY_CONFIG", str(file))
    sb = await sandbay.create_sandbox()
    try:
        env, labels = await _spec_seen_by(sb)
    finally:
        await sb.aclose()
    assert env == "the-config-file" and labels["origin"] == "sandbay-toml"


@pytest.mark.anyio
async def test_an_explicit_spec_replaces_the_config_spec(config_in_cwd: Path) -> None:
    async with sandbay.open_sandbox(None, sandbay.SandboxSpec(labels={"mine": "1"})) as sb:
        env, labels = await _spec_seen_by(sb)
    assert env == "" and "origin" not in labels and labels["mine"] == "1"


@pytest.mark.anyio
async def test_run_agent_applies_the_config_file_spec(config_in_cwd: Path) -> None:
    from claude_agent_sdk import ClaudeAgentOptions

    from sandbay.testing import ScriptedModel, Turn

    script = [
        Turn.tool_use("Bash", {"command": 'echo "spec env: $SANDBAY_TEST_FROM"'}),
        Turn.text("done"),
    ]
    options = ClaudeAgentOptions(max_turns=3, allowed_tools=["Bash"])
    async with ScriptedModel(script) as model:
        async with sandbay.run_agent("go", options=options, env=model.env(), timeout=120) as run:
            async for _ in run:
                pass
        results = model.tool_results()
    assert "spec env: the-config-file" in str(results)


def test_missing_config_file_from_the_environment_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SANDBAY_CONFIG", str(tmp_path / "missing.toml"))
    with pytest.raises(sandbay.ConfigError, match=r"missing\.toml.*does not exist"):
        sandbay.get_provider()


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"cpu": -1}, "cpu"),
        ({"cpu": float("nan")}, "cpu"),
        ({"memory_mb": 0}, "memory_mb"),
        ({"lifetime_s": float("inf")}, "lifetime_s"),
        ({"network": "bridge"}, "network"),
        ({"cpus": 2}, "cpus"),
    ],
)
def test_bad_spec_values_raise_config_error_naming_the_field(
    fields: dict[str, object], named: str
) -> None:
    with pytest.raises(sandbay.ConfigError, match=rf"SandboxSpec: {named}: ") as caught:
        sandbay.SandboxSpec(**fields)  # type: ignore[arg-type]
    assert isinstance(caught.value, ValueError)
    with pytest.raises(sandbay.ConfigError, match=rf"SandboxSpec: {named}: "):
        sandbay.SandboxSpec.model_validate(fields)
    if named != "lifetime_s" and "nan" not in repr(fields):  # JSON has no inf or nan
        with pytest.raises(sandbay.ConfigError, match=rf"SandboxSpec: {named}: "):
            sandbay.SandboxSpec.model_validate_json(json.dumps(fields))


def test_a_valid_spec_still_validates_and_nests() -> None:
    spec = sandbay.SandboxSpec.model_validate({"cpu": 1.5, "labels": {"a": "b"}})
    assert spec.cpu == 1.5 and spec == sandbay.SandboxSpec(cpu=1.5, labels={"a": "b"})
    config = parse_config({"spec": {"cpu": 2}})
    assert config.spec.cpu == 2
