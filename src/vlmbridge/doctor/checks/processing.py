"""Tokenizer, chat template and (for VLMs) image/video processor configs, in both folder layouts."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from vlmbridge.doctor.checks.environment import permission_denied
from vlmbridge.doctor.context import Context, JsonFile
from vlmbridge.doctor.findings import Evidence, Finding, Severity

__all__ = ["check_chat_template", "check_processors", "check_tokenizer_files"]

_TOKENIZER_JSONS = ("tokenizer.json", "tokenizer_config.json", "chat_template.json")


def _unreadable(ctx: Context, f: JsonFile, code: str) -> Finding:
    if f.error and "permission denied" in f.error:
        return permission_denied(ctx, f.name)
    return Finding(
        code,
        Severity.ERROR,
        f"{f.name} is unreadable: {f.error}",
        fix=f"re-download {f.name}",
        evidence=Evidence(file=f.name, value=(f.error or "")[:120]),
    )


def check_tokenizer_files(ctx: Context) -> Iterator[Finding]:
    entries = ctx.entries
    has_fast = "tokenizer.json" in entries
    has_bpe = "vocab.json" in entries and "merges.txt" in entries
    has_other = any(n in entries for n in ("tokenizer.model", "vocab.txt", "spiece.model", "tokenizer.tiktoken"))
    has_remote = any("Tokenizer" in k for k in ctx.auto_map)
    if not (has_fast or has_bpe or has_other or has_remote):
        yield Finding(
            "VB120",
            Severity.ERROR,
            "no tokenizer files (tokenizer.json, or vocab.json + merges.txt): transformers builds an empty "
            "tokenizer and every image/special token is lost",
            fix="download tokenizer.json, vocab.json, merges.txt and tokenizer_config.json from the model's repository",
            evidence=Evidence(file="tokenizer.json", value="missing"),
        )
    for name in _TOKENIZER_JSONS:
        f = ctx.json(name)
        if f.present and not f.ok:
            yield _unreadable(ctx, f, "VB121")
    if "tokenizer_config.json" not in entries:
        yield Finding(
            "VB122",
            Severity.WARNING,
            "tokenizer_config.json is missing: the tokenizer will not know its eos/pad tokens or maximum length",
            fix="download tokenizer_config.json from the model's repository",
            evidence=Evidence(file="tokenizer_config.json", value="missing"),
        )


def _template_in(value: Any) -> bool:
    # A single template string, or transformers' list of {"name", "template"} for several templates.
    if isinstance(value, str):
        return bool(value.strip())
    return isinstance(value, list) and any(isinstance(t, dict) and t.get("template") for t in value)


def check_chat_template(ctx: Context) -> Iterator[Finding]:
    entries = ctx.entries
    jinja = "chat_template.jinja" in entries or "chat_templates" in entries
    in_tokenizer = _template_in(ctx.json("tokenizer_config.json").mapping.get("chat_template"))
    if ctx.is_vlm:
        # The processor reads chat_template.json / .jinja only, never tokenizer_config's copy.
        legacy = _template_in(ctx.json("chat_template.json").mapping.get("chat_template"))
        nested = _template_in(ctx.json("processor_config.json").mapping.get("chat_template"))
        if legacy or jinja or nested:
            return
        where = " (tokenizer_config.json has one, but the processor does not read it there)" if in_tokenizer else ""
        yield Finding(
            "VB123",
            Severity.ERROR,
            f"no chat template for the processor{where}: chat requests fail with 'this processor does not have "
            "a chat template'",
            fix="download chat_template.json from the model's repository"
            + (", or save tokenizer_config.json's chat_template as chat_template.jinja" if in_tokenizer else ""),
            evidence=Evidence(file="chat_template.json", value="missing"),
        )
    elif not (in_tokenizer or jinja):
        yield Finding(
            "VB123",
            Severity.ERROR,
            "no chat template (tokenizer_config.json chat_template or chat_template.jinja): chat requests fail",
            fix="use the -Instruct/-Chat checkpoint, or copy its chat_template into tokenizer_config.json",
            evidence=Evidence(file="tokenizer_config.json", value="chat_template missing"),
        )


def check_processors(ctx: Context) -> Iterator[Finding]:
    if not ctx.is_vlm:
        return
    for name in ("preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json"):
        f = ctx.json(name)
        if f.present and not f.ok:
            yield _unreadable(ctx, f, "VB134")
    image = ctx.processor_section("image")
    if image is None:
        if not ctx.json("preprocessor_config.json").present:
            yield Finding(
                "VB130",
                Severity.ERROR,
                "no image processor config (preprocessor_config.json, or processor_config.json with an "
                "image_processor): transformers cannot build the processor, so images cannot be used",
                fix="download preprocessor_config.json from the model's repository",
                evidence=Evidence(file="preprocessor_config.json", value="missing"),
            )
    else:
        yield from _check_image(ctx, *image)
    yield from _check_processor_class(ctx)
    yield from _check_video(ctx)


def _check_image(ctx: Context, file: str, section: Mapping[str, Any]) -> Iterator[Finding]:
    tf = ctx.tf
    kind = section.get("image_processor_type")
    if tf.installed and isinstance(kind, str) and not tf.image_processor_resolves(kind):
        known = sorted(c for c in tf.image_processor_classes if c.startswith(kind[:6]))[:3]
        fix = (
            f'set "image_processor_type": "Qwen2VLImageProcessor" in {file} (or re-download it)'
            if kind.startswith("Qwen")
            else f"set image_processor_type in {file} to a class transformers {tf.version} has"
            + (f" (e.g. {', '.join(known)})" if known else "")
        )
        yield Finding(
            "VB131",
            Severity.ERROR,
            f'{file} names image_processor_type "{kind}", which transformers {tf.version} does not have '
            '("Unrecognized image processor")',
            fix=fix,
            evidence=Evidence(file=file, value=kind),
        )
    elif (
        tf.installed
        and kind is None
        and ctx.model_type
        and ctx.model_type not in tf.table("IMAGE_PROCESSOR_MAPPING_NAMES")
    ):
        yield Finding(
            "VB131",
            Severity.ERROR,
            f"{file} has no image_processor_type and transformers {tf.version} has no image processor for "
            f"model_type {ctx.model_type!r}",
            fix=f"add the image_processor_type of the model's repository to {file}",
            evidence=Evidence(file=file, value="image_processor_type missing"),
        )
    yield from _check_size(file, section, "image", ctx)


def _check_size(file: str, section: Mapping[str, Any], kind: str, ctx: Context) -> Iterator[Finding]:
    """Qwen-VL processors need size = {shortest_edge, longest_edge}; flat min/max_pixels are folded into it."""
    fam = ctx.family
    if fam is None or not fam.is_vlm:
        return
    size = section.get("size")
    if size is None:
        return
    keys = set(size) if isinstance(size, dict) else set()
    if "min_pixels" in section:
        keys.add("shortest_edge")
    if "max_pixels" in section:
        keys.add("longest_edge")
    if {"shortest_edge", "longest_edge"} <= keys:
        return
    old = sorted(set(size) if isinstance(size, dict) else {str(size)})
    lo = (size.get("min_pixels") if isinstance(size, dict) else None) or section.get("min_pixels") or 3136
    hi = (size.get("max_pixels") if isinstance(size, dict) else None) or section.get("max_pixels") or 12845056
    yield Finding(
        "VB132",
        Severity.ERROR,
        f'{file}: the {kind} processor\'s "size" has {", ".join(old)} but transformers needs shortest_edge and '
        "longest_edge (\"size must contain 'shortest_edge' and 'longest_edge' keys\" on the first image)",
        fix=f'set "size": {{"shortest_edge": {lo}, "longest_edge": {hi}}} in {file}',
        evidence=Evidence(file=file, value=f"size={size}"),
    )


def _check_processor_class(ctx: Context) -> Iterator[Finding]:
    tf = ctx.tf
    if not tf.installed or "AutoProcessor" in ctx.auto_map:
        return
    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        value = ctx.json(name).mapping.get("processor_class")
        if isinstance(value, str):
            if value not in tf.processor_classes:
                yield Finding(
                    "VB131",
                    Severity.ERROR,
                    f'{name} names processor_class "{value}", which transformers {tf.version} does not have: '
                    "AutoProcessor silently returns a bare tokenizer and images are dropped",
                    fix=f'set "processor_class" in {name} to the family\'s processor'
                    + (f' ("{ctx.family.processor_class}")' if ctx.family and ctx.family.processor_class else ""),
                    evidence=Evidence(file=name, value=value),
                )
            return  # the first file that names one is the one AutoProcessor uses


def _check_video(ctx: Context) -> Iterator[Finding]:
    video = ctx.processor_section("video")
    fam = ctx.family
    if video is None:
        if fam is not None and "video_preprocessor_config.json" in fam.official_files:
            yield Finding(
                "VB133",
                Severity.WARNING,
                f"no video processor config: {fam.official_repo} ships video_preprocessor_config.json; without "
                "it transformers builds the video processor from the image settings (a different pixel budget)",
                fix=f"download video_preprocessor_config.json from {fam.official_repo}",
                evidence=Evidence(file="video_preprocessor_config.json", value="missing"),
            )
        return
    file, section = video
    kind = section.get("video_processor_type")
    tf = ctx.tf
    if tf.installed and isinstance(kind, str) and kind not in tf.video_processor_classes:
        yield Finding(
            "VB131",
            Severity.ERROR,
            f'{file} names video_processor_type "{kind}", which transformers {tf.version} does not have '
            '("Unrecognized video processor")',
            fix=f"re-download {file} from the model's repository",
            evidence=Evidence(file=file, value=kind),
        )
    yield from _check_size(file, section, "video", ctx)
