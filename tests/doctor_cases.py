"""Helpers for the doctor tests: mutate tiny checkpoints, and capture what plain transformers does with them."""

from __future__ import annotations

import json
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from vlmbridge.catalogue import classify_all
from vlmbridge.doctor import DoctorOptions, Report, Severity, diagnose

# Plenty of memory, so memory findings never hide the finding a test is about.
ROOMY = DoctorOptions(gpu_memory=1 << 40, device="cpu")


def doctor(folder: Path | str, **options: Any) -> Report:
    base = {"gpu_memory": ROOMY.gpu_memory, "device": "cpu"}
    return diagnose(folder, DoctorOptions(**{**base, **options}))


def errors(report: Report) -> list[str]:
    return report.codes(Severity.ERROR)


def warns(report: Report) -> list[str]:
    return report.codes(Severity.WARNING)


def problems(report: Report) -> list[str]:
    return errors(report) + warns(report)


def edit_json(path: Path, change: Callable[[dict[str, Any]], object]) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    change(data)
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")


def rewrite_shard(path: Path, change: Callable[[dict[str, Any]], object]) -> None:
    """Load a shard's tensors, let `change` edit the dict, save it back (a re-export of the shard)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


@contextmanager
def quiet() -> Iterator[None]:
    """transformers warns freely while loading broken folders; the failure is what the test is about."""
    import transformers

    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        transformers.logging.set_verbosity(level)


def failure(action: Callable[[], object]) -> str:
    """Run `action`, which must raise; return the full traceback text as a user would paste it."""
    with quiet():
        try:
            action()
        except Exception:
            return traceback.format_exc()
    pytest.fail("transformers accepted the broken folder; the test expected a real failure")


def load_vlm(folder: Path) -> Any:
    import transformers

    with quiet():
        return transformers.AutoModelForImageTextToText.from_pretrained(folder)


def load_processor(folder: Path) -> Any:
    import transformers

    with quiet():
        return transformers.AutoProcessor.from_pretrained(folder)  # type: ignore[no-untyped-call]


def generate_with_image(folder: Path) -> Any:
    """The user's first real request: processor + model + one image, one new token."""
    from PIL import Image

    processor = load_processor(folder)
    model = load_vlm(folder)
    messages = [
        {"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (64, 64), "red")},
                                     {"type": "text", "text": "What is this?"}]}
    ]  # fmt: skip
    with quiet():
        inputs = processor.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=True, return_dict=True, return_tensors="pt"
        )
        return model.generate(**inputs, max_new_tokens=1, do_sample=False)


def explained_by(traceback_text: str, code: str) -> None:
    """`vlmbridge explain` maps the real traceback to a catalogue entry that names this doctor check."""
    entries = classify_all(traceback_text)
    assert entries, f"explain does not know this traceback:\n{traceback_text[-600:]}"
    assert code in entries[0].doctor_checks, (entries[0].code, entries[0].doctor_checks, traceback_text[-600:])
