"""One source for every setting: the fields of ModelSettings / ServerSettings give the CLI flags, their help and
bounds, the environment variables and the engine limits; flags override the environment, which overrides the
defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from vlmbridge.cli import chat as chat_cli
from vlmbridge.cli import serve as serve_cli
from vlmbridge.cli.app import app
from vlmbridge.cli.options import flag_of, setting_flags
from vlmbridge.engine.transformers.engine import EngineLimits
from vlmbridge.settings import ModelSettings, ServerSettings, Settings

PIN = "a" * 64
FIELDS = set(Settings.model_fields)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in [n for n in os.environ if n.startswith("VLMBRIDGE_")]:
        monkeypatch.delenv(name)


def command_params(name: str) -> dict[str, Any]:
    group = typer.main.get_command(app)
    command = group.commands[name]  # type: ignore[attr-defined]
    return {p.name: p for p in command.params}


def invoke(monkeypatch: pytest.MonkeyPatch, *args: str) -> Settings:
    """`vlmbridge serve ARGS` up to the Settings it would run with."""
    seen: list[Settings] = []
    monkeypatch.setattr(serve_cli, "run_server", seen.append)
    result = CliRunner().invoke(app, ["serve", *args])
    assert result.exit_code == 0, result.output
    return seen[0]


def test_model_and_server_settings_share_no_field() -> None:
    model, server = set(ModelSettings.model_fields), set(ServerSettings.model_fields)
    assert not model & server
    assert model | server == FIELDS


def test_every_field_has_one_default_a_description_and_bounds() -> None:
    for name, field in Settings.model_fields.items():
        assert field.description, name
        if field.annotation in (int, float, int | None, float | None):
            kinds = {type(m).__name__ for m in field.metadata}
            assert kinds & {"Ge", "Gt"} and kinds & {"Le", "Lt"}, name


def test_every_setting_has_a_flag_on_serve() -> None:
    params = command_params("serve")
    assert params["model_dir"].param_type_name == "argument"
    for name in FIELDS - {"model"}:
        assert name in params, name
        option = params[name]
        spelled = flag_of(name).split("/")
        assert [*option.opts, *option.secondary_opts] == spelled, name


def test_help_shows_environment_variables_and_defaults() -> None:
    result = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "250", "TERMINAL_WIDTH": "250"})
    assert result.exit_code == 0
    # Brackets in help must survive rich markup (they used to vanish).
    for text in ("[env: VLMBRIDGE_HOST]", "[default: 127.0.0.1]", "[env: VLMBRIDGE_CONTEXT_LENGTH]", "--context"):
        assert text in result.output


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("chat", {"dtype", "device", "quantization", "allow_dequantize", "allow_pickle_weights", "trust_remote_code",
                  "context_length", "max_pixels"}),
        ("demo", {"dtype", "device", "quantization", "skip_doctor", "cache_dir"}),
        ("bench", {"dtype", "cache_dir"}),
        ("doctor", {"dtype", "device"}),
        ("plan", {"device"}),
        ("quantize", {"device", "trust_remote_code"}),
    ],
)  # fmt: skip
def test_other_commands_take_their_settings_from_the_fields(command: str, expected: set[str]) -> None:
    params = command_params(command)
    for name in expected:
        assert [*params[name].opts, *params[name].secondary_opts] == flag_of(name).split("/"), (command, name)


def test_the_existing_spellings_land_in_their_fields(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    settings = invoke(
        monkeypatch, str(tmp_path), "--host", "0.0.0.0", "--port", "9000", "--served-model-name", "vl",
        "--api-key", "k1", "--api-key", "k2", "--dtype", "bf16", "--device", "cpu", "--context", "4096",
        "--max-pixels", "401408", "--max-images", "3", "--allow-image-host", "api", "--allow-image-host", "10.0.0.0/8",
        "--allow-local-dir", str(tmp_path), "--max-batch-size", "2", "--max-queue", "5", "--request-timeout", "9",
        "--prefix-cache-mb", "0", "--encoder-cache-mb", "1", "--pixel-cache-mb", "2",
        "--max-pixels-in-flight", "20000000", "--skip-doctor", "--stream-usage", "requested", "--shutdown-grace", "3",
        "--public-metrics", "--trust-remote-code", f"/m=modeling.py:{PIN}", "--refuse-pickle-weights",
        "--quantization", "bnb-4bit", "--allow-dequantize",
    )  # fmt: skip
    assert settings.model == tmp_path and (settings.host, settings.port) == ("0.0.0.0", 9000)
    assert settings.served_model_name == "vl"
    assert [k.get_secret_value() for k in settings.api_keys] == ["k1", "k2"]
    assert (settings.dtype, settings.device) == ("bf16", "cpu")
    assert (settings.context_length, settings.max_pixels) == (4096, 401408)
    assert settings.max_images == 3 and settings.allow_image_hosts == ["api", "10.0.0.0/8"]
    assert settings.allow_local_dirs == [tmp_path]
    assert (settings.max_batch_size, settings.max_queue, settings.request_timeout) == (2, 5, 9.0)
    assert (settings.prefix_cache_mb, settings.encoder_cache_mb, settings.pixel_cache_mb) == (0, 1, 2)
    assert settings.max_pixels_in_flight == 20_000_000 and settings.skip_doctor and settings.public_metrics
    assert (settings.stream_usage, settings.shutdown_grace) == ("requested", 3.0)
    assert settings.trust_remote_code == {"/m": {"modeling.py": PIN}}
    assert settings.allow_pickle_weights is False and settings.allow_dequantize is True
    assert settings.quantization == "bnb-4bit"


def test_settings_that_had_no_flag_have_one(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = invoke(
        monkeypatch, "--attn-implementation", "eager", "--min-pixels", "4096", "--low-detail-pixels", "65536",
        "--max-new-tokens", "7", "--max-prefill-tokens", "512", "--batch-wait-ms", "0", "--torch-threads", "2",
        "--engine-stall-timeout", "0", "--max-image-bytes", "2048", "--max-body-bytes", "4096",
        "--image-fetch-timeout", "2.5", "--image-max-redirects", "0", "--keepalive-interval", "1",
        "--cache-dir", "/tmp/vb-cache", "--allow-pickle-weights", "--refuse-dequantize",
    )  # fmt: skip
    assert (settings.attn_implementation, settings.min_pixels, settings.low_detail_pixels) == ("eager", 4096, 65536)
    assert (settings.max_new_tokens, settings.max_prefill_tokens, settings.batch_wait_ms) == (7, 512, 0.0)
    assert (settings.torch_threads, settings.engine_stall_timeout) == (2, 0.0)
    assert (settings.max_image_bytes, settings.max_body_bytes) == (2048, 4096)
    assert (settings.image_fetch_timeout, settings.image_max_redirects, settings.keepalive_interval) == (2.5, 0, 1.0)
    assert settings.cache_dir == Path("/tmp/vb-cache")
    assert settings.allow_pickle_weights is True and settings.allow_dequantize is False


def test_flags_override_the_environment_which_overrides_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    assert invoke(monkeypatch).max_queue == 64
    monkeypatch.setenv("VLMBRIDGE_MAX_QUEUE", "5")
    monkeypatch.setenv("VLMBRIDGE_API_KEYS", "a,b")
    monkeypatch.setenv("VLMBRIDGE_ALLOW_PICKLE_WEIGHTS", "true")
    from_env = invoke(monkeypatch)
    assert from_env.max_queue == 5 and len(from_env.api_keys) == 2 and from_env.allow_pickle_weights
    from_flags = invoke(monkeypatch, "--max-queue", "7", "--api-key", "c", "--refuse-pickle-weights")
    assert from_flags.max_queue == 7 and [k.get_secret_value() for k in from_flags.api_keys] == ["c"]
    assert from_flags.allow_pickle_weights is False


def test_bounds_are_checked_on_the_command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(serve_cli, "run_server", lambda settings: None)
    result = CliRunner().invoke(app, ["serve", "--port", "70000"])
    assert result.exit_code == 2 and "--port" in result.output
    result = CliRunner().invoke(app, ["serve", "--dtype", "int3"])
    assert result.exit_code == 2 and "--dtype" in result.output


def test_chat_keeps_its_own_options_and_takes_the_model_settings(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    seen: dict[str, Any] = {}

    def fake_run_chat(settings: Settings, model_dir: Path, prompt: str, images: list[Path], **kw: Any) -> None:
        seen.update(settings=settings, model_dir=model_dir, prompt=prompt, images=images, **kw)

    monkeypatch.setattr(chat_cli, "run_chat", fake_run_chat)
    args = [
        "chat", str(tmp_path), "hi", "-i", "a.png", "--image", "b.png", "--system", "be brief", "--max-tokens", "5",
        "--temperature", "0", "--seed", "1", "--dtype", "fp32", "--context", "2048", "--quantization", "none",
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert seen["images"] == [Path("a.png"), Path("b.png")] and seen["prompt"] == "hi"
    assert (seen["system"], seen["max_tokens"], seen["temperature"], seen["seed"]) == ("be brief", 5, 0.0, 1)
    settings = seen["settings"]
    assert (settings.dtype, settings.context_length, settings.quantization) == ("fp32", 2048, "none")


def test_model_settings_are_the_model_part() -> None:
    settings = Settings(context_length=1024, batch_wait_ms=10, prefix_cache_mb=3, host="0.0.0.0")
    model = settings.model_settings()
    assert type(model) is ModelSettings and model.context_length == 1024
    assert model.model_dump() == {name: getattr(settings, name) for name in ModelSettings.model_fields}


def test_engine_limits_come_from_the_model_settings() -> None:
    # The engine's own defaults are the settings' defaults: one source.
    assert EngineLimits.from_settings(ModelSettings()) == EngineLimits()
    limits = EngineLimits.from_settings(
        ModelSettings(batch_wait_ms=10, prefix_cache_mb=3, encoder_cache_mb=0, torch_threads=3), on_cpu=True
    )
    assert (limits.batch_wait_s, limits.prefix_cache_bytes, limits.encoder_cache_bytes) == (0.01, 3 << 20, 0)
    assert (limits.prefill_threads, limits.decode_threads) == (3, 3)


def test_a_command_may_not_take_a_setting_twice() -> None:
    def command(dtype: str = "auto", *, flags: dict[str, Any]) -> None: ...

    with pytest.raises(TypeError, match="dtype"):
        setting_flags("dtype")(command)
