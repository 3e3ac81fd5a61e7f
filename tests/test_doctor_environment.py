"""Environment (paths, containers, permissions) and the promise that the doctor never raises, whatever the folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

import vlmbridge
from tests.conftest import TinyFactory
from tests.doctor_cases import doctor, edit_json, errors, explained_by, failure
from vlmbridge.doctor import Report, Severity, diagnose
from vlmbridge.doctor.checks.environment import detect_container, looks_like_host_path


def test_missing_path_suggests_the_close_name(tiny_model: TinyFactory, tmp_path: Path) -> None:
    shutil.copytree(tiny_model("qwen3_vl"), tmp_path / "Qwen3-VL-8B-Instruct")
    report = doctor(tmp_path / "Qwen3-VL-8B-Instuct", in_container=False)
    [finding] = report.findings
    assert finding.code == "VB601" and "did you mean" in finding.message and report.exit_code == 1


def test_host_path_inside_a_container(tmp_path: Path) -> None:
    raw = "/home/alice/models/Qwen3-VL-8B-Instruct"
    report = doctor(raw, in_container=True)
    [finding] = report.findings
    assert finding.code == "VB600" and finding.severity == Severity.ERROR
    assert finding.fix is not None and f"{raw}:/models/Qwen3-VL-8B-Instruct:ro" in finding.fix
    import transformers

    explained_by(failure(lambda: transformers.AutoConfig.from_pretrained(raw)), "VB600")


def test_windows_and_home_paths_look_like_host_paths() -> None:
    assert looks_like_host_path("C:\\Users\\me\\Qwen3-VL") and looks_like_host_path("/Users/me/models/x")
    assert looks_like_host_path("~/models/x") and not looks_like_host_path("/models/Qwen3-VL-8B-Instruct")


def test_container_detection(tmp_path: Path) -> None:
    docker, k8s, bare = tmp_path / "docker", tmp_path / "k8s", tmp_path / "bare"
    (docker / "proc/1").mkdir(parents=True)
    (docker / ".dockerenv").touch()
    (k8s / "proc/1").mkdir(parents=True)
    (k8s / "proc/1/cgroup").write_text("0::/kubepods/besteffort/pod1234/abcd\n")
    (bare / "proc/1").mkdir(parents=True)
    (bare / "proc/1/cgroup").write_text("0::/init.scope\n")
    assert detect_container(docker) and detect_container(k8s)
    assert detect_container(bare) == bool(os.environ.get("KUBERNETES_SERVICE_HOST"))


def test_file_instead_of_folder(tiny_model: TinyFactory) -> None:
    config = tiny_model("qwen3_vl") / "config.json"
    [finding] = doctor(config).findings
    assert finding.code == "VB604" and finding.fix == f"pass the folder: vlmbridge doctor {config.parent}"


def test_empty_folder(tmp_path: Path) -> None:
    assert errors(doctor(tmp_path)) == ["VB605"]


def test_model_one_level_deeper_like_a_hugging_face_cache(tiny_model: TinyFactory, tmp_path: Path) -> None:
    root = tmp_path / "models--Qwen--Qwen3-VL-8B-Instruct"
    snapshot = root / "snapshots" / "0123abcd"
    shutil.copytree(tiny_model("qwen3_vl"), snapshot)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text("0123abcd")
    report = doctor(root)
    [finding] = [f for f in report.findings if f.code == "VB606"]
    assert finding.fix == f"vlmbridge doctor {snapshot}"
    assert "VB100" not in report.codes()


def _python_for_nobody() -> str:
    """An interpreter of this Python version that an unprivileged user may execute (ours may sit under /root)."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (sys.executable, shutil.which(version) or "", f"/usr/bin/{version}"):
        if not candidate:
            continue
        try:
            probe = subprocess.run([candidate, "-S", "-c", "print(1)"], capture_output=True, timeout=30, user=65534)
        except OSError:
            continue
        if probe.returncode == 0:
            return candidate
    pytest.skip(f"no {version} executable by an unprivileged user")


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="POSIX permissions")
def test_permission_denied_and_read_only_folder(tiny_model: TinyFactory) -> None:
    # As root every file is readable, so run the doctor as an unprivileged user on a world-traversable copy.
    base = Path(tempfile.mkdtemp(prefix="vb-perm-", dir="/tmp"))
    try:
        folder = base / "model"
        shutil.copytree(tiny_model("qwen3_vl"), folder)
        for p in (base, folder, *folder.iterdir()):
            p.chmod(0o755 if p.is_dir() else 0o644)
        (folder / "config.json").chmod(0o600)
        if os.geteuid() != 0:
            codes = diagnose(folder).codes()
        else:
            python = _python_for_nobody()
            src = Path(vlmbridge.__file__).resolve().parents[1]
            site = sysconfig.get_paths()["purelib"]
            code = (
                f"import sys; sys.path[:0] = [{str(src)!r}, {site!r}]; from vlmbridge.cli.app import main; "
                f"sys.exit(main(['doctor', {str(folder)!r}, '--json', '--gpu-memory', '1TiB']))"
            )
            run = subprocess.run([python, "-S", "-c", code], capture_output=True, text=True, timeout=120, user=65534)
            assert run.returncode == 1, run.stderr[-2000:]
            codes = [f["code"] for f in json.loads(run.stdout)["findings"]]
        assert "VB602" in codes and "VB101" not in codes  # named as a permission problem, not a broken file
        assert "VB603" in codes  # not writable by this user: said plainly, and fine
    finally:
        shutil.rmtree(base, ignore_errors=True)


# --- never raises ------------------------------------------------------------------------------------------
def _run_with_deadline(path: Path | str, seconds: float = 20.0) -> Report:
    """Run the doctor in a thread: a hang (e.g. opening a FIFO) fails the test instead of blocking the suite."""
    box: dict[str, object] = {}

    def target() -> None:
        try:
            box["report"] = diagnose(path)
        except BaseException as exc:  # the test reports it below
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "the doctor hung"
    assert "error" not in box, f"the doctor raised {box.get('error')!r}"
    report = box["report"]
    assert isinstance(report, Report)
    assert "VB900" not in report.codes(), [f.message for f in report.findings if f.code == "VB900"]
    return report


def _write(name: str, data: bytes) -> Callable[[Path], None]:
    def write(folder: Path) -> None:
        (folder / name).write_bytes(data)

    return write


def _fifo_config(folder: Path) -> None:
    (folder / "config.json").unlink()
    os.mkfifo(folder / "config.json")


def _dir_config(folder: Path) -> None:
    (folder / "config.json").unlink()
    (folder / "config.json").mkdir()


def _edit(name: str, key: str, value: object) -> Callable[[Path], None]:
    return lambda folder: edit_json(folder / name, lambda c: c.__setitem__(key, value))


ABUSE: dict[str, Callable[[Path], None]] = {
    "config-binary": _write("config.json", bytes(range(256)) * 4),
    "config-deeply-nested": _write("config.json", b"[" * 200_000 + b"]" * 200_000),
    "config-null": _write("config.json", b"null"),
    "config-is-a-fifo": _fifo_config,
    "config-is-a-folder": _dir_config,
    "text-config-a-string": _edit("config.json", "text_config", "qwen"),
    "vision-config-a-list": _edit("config.json", "vision_config", [1, 2]),
    "architectures-a-string": _edit("config.json", "architectures", "Qwen3VLForConditionalGeneration"),
    "auto-map-a-list": _edit("config.json", "auto_map", ["modeling.X"]),
    "quantization-config-a-string": _edit("config.json", "quantization_config", "fp8"),
    "model-type-a-number": _edit("config.json", "model_type", 7),
    "image-token-id-a-string": _edit("config.json", "image_token_id", "151655"),
    "shard-eight-bytes-only": _write("model.safetensors", (2**63).to_bytes(8, "little")),
    "shard-empty": _write("model.safetensors", b""),
    "shard-header-is-a-list": _write("model.safetensors", (2).to_bytes(8, "little") + b"[]"),
    "shard-negative-offsets": _write(
        "model.safetensors",
        (64).to_bytes(8, "little") + b'{"w":{"dtype":"BF16","shape":[2],"data_offsets":[8,-4]}}'.ljust(64),
    ),
    "tokenizer-null": _write("tokenizer.json", b"null"),
    "tokenizer-vocab-a-list": _write("tokenizer.json", b'{"model": {"vocab": [1, 2]}, "added_tokens": 5}'),
    "preprocessor-size-a-string": _edit("preprocessor_config.json", "size", "big"),
    "preprocessor-a-list": _write("preprocessor_config.json", b"[1]"),
    "generation-eos-a-string": _edit("generation_config.json", "eos_token_id", "<|im_end|>"),
    "index-weight-map-a-list": _write("model.safetensors.index.json", b'{"weight_map": ["a", "b"]}'),
    "python-file-unreadable-name": _write("mod\udcff.py".encode("utf-8", "surrogateescape").decode("latin-1"), b"x"),
}


@pytest.mark.parametrize("mutate", list(ABUSE.values()), ids=list(ABUSE))
def test_never_raises_on_abuse(tiny_copy: TinyFactory, mutate: Callable[[Path], None]) -> None:
    folder = tiny_copy("qwen3_vl")
    mutate(folder)
    _run_with_deadline(folder)


def test_never_raises_on_a_symlink_loop_as_the_folder(tmp_path: Path) -> None:
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    assert _run_with_deadline(tmp_path / "a").codes() == ["VB115"]


@pytest.mark.parametrize("raw", ["", "bad\x00path", "~nonexistent-user-xyz/model", "a" * 5000])
def test_never_raises_on_odd_path_strings(raw: str) -> None:
    assert _run_with_deadline(raw).exit_code == 1


def test_a_crashing_check_becomes_vb900_and_the_rest_still_run(
    tiny_model: TinyFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vlmbridge.doctor import runner

    def check_that_breaks(ctx: object) -> list[object]:
        raise RuntimeError("boom")

    monkeypatch.setattr(runner, "CHECKS", (check_that_breaks, *runner.CHECKS))
    report = diagnose(tiny_model("qwen3_vl"))
    [finding] = [f for f in report.findings if f.code == "VB900"]
    assert "check_that_breaks" in finding.message and "boom" in finding.message
    assert {"VB204", "VB500"} <= set(report.codes()) and report.exit_code == 0
