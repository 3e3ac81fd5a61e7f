"""Architecture & versions: model_type known here, the classes, VLM vs text, token ids vs the tokenizer, rope."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator, Mapping
from typing import Any

from vlmbridge.doctor.context import Context
from vlmbridge.doctor.findings import Evidence, Finding, Severity
from vlmbridge.families import MIN_TRANSFORMERS
from vlmbridge.folder import SafetensorsHeader

__all__ = ["check_architecture", "check_rope", "check_token_ids", "check_vision_weights", "version_tuple"]

# config key → the Qwen token the processor inserts for it (facts file: token ids).
_QWEN_VISION_TOKENS = {
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
}
_LEGACY_KEYS = {"image_token_id": "image_token_index", "video_token_id": "video_token_index"}
_VISION_PREFIXES = (
    "visual.",
    "model.visual.",
    "vision_tower.",
    "model.vision_tower.",
    "vision_model.",
    "model.vision_model.",
)
_DEFAULT_MROPE_SUM = 64  # transformers' default sections ([16, 24, 24] / [24, 20, 20]) fit 128-dim heads


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text.split("+")[0])[:3])


def check_architecture(ctx: Context) -> Iterator[Finding]:
    if not ctx.config_file.ok or not ctx.tf.installed:
        return
    tf, mt = ctx.tf, ctx.model_type
    remote = bool(ctx.auto_map)
    if mt is None:
        if not remote:
            yield Finding(
                "VB200",
                Severity.ERROR,
                "config.json has no model_type: transformers cannot pick a class "
                '("Unrecognized model ... Should have a `model_type` key")',
                fix="re-download config.json from the model's repository",
                evidence=Evidence(file="config.json", value="model_type missing"),
            )
        return
    if not tf.knows_model_type(mt) and not remote:
        yield _unknown_model_type(ctx, mt)
        return
    saved = ctx.config.get("transformers_version")
    if isinstance(saved, str) and tf.version and version_tuple(saved)[:2] > version_tuple(tf.version)[:2]:
        yield Finding(
            "VB210",
            Severity.INFO,
            f"config.json was written by transformers {saved}, newer than the installed {tf.version}; "
            "if loading fails on unknown config keys, upgrade",
            fix=f'pip install -U "transformers>={saved}"',
            evidence=Evidence(file="config.json", value=f"transformers_version={saved}"),
        )
    resolved = tf.auto_class_for(mt) if tf.knows_model_type(mt) else None
    if resolved is None and remote:
        auto = (
            "AutoModelForImageTextToText" if "AutoModelForImageTextToText" in ctx.auto_map else "AutoModelForCausalLM"
        )
        resolved = ("vlm" if auto == "AutoModelForImageTextToText" else "text", auto)
    if resolved is not None:
        kind, auto = resolved
        ctx.facts.update(kind=kind, auto_class=auto)
        yield _kind_finding(ctx, kind, auto)
    if not remote:
        yield from _check_architectures(ctx, mt)


def _unknown_model_type(ctx: Context, mt: str) -> Finding:
    tf = ctx.tf
    need = MIN_TRANSFORMERS.get(mt)
    if need:
        return Finding(
            "VB201",
            Severity.ERROR,
            f"model_type {mt!r} needs transformers >= {need}; {tf.version} is installed "
            '("does not recognize this architecture" / KeyError)',
            fix=f'pip install -U "transformers>={need}"',
            evidence=Evidence(file="config.json", value=f"model_type={mt}"),
        )
    close = difflib.get_close_matches(mt, list(tf.table("CONFIG_MAPPING_NAMES")), n=1, cutoff=0.8)
    hint = f'; did you mean "{close[0]}"?' if close else ""
    return Finding(
        "VB201",
        Severity.ERROR,
        f"model_type {mt!r} is unknown to the installed transformers {tf.version}{hint}",
        fix=(f'set "model_type": "{close[0]}" in config.json if that is a typo, else ' if close else "")
        + "pip install -U transformers (or install from source for day-0 models)",
        evidence=Evidence(file="config.json", value=f"model_type={mt}"),
    )


def _kind_finding(ctx: Context, kind: str, auto: str) -> Finding:
    fam = ctx.family
    name = fam.display_name if fam else ctx.model_type
    if kind == "vlm":
        cls = f" (or {fam.model_class})" if fam else ""
        return Finding(
            "VB204",
            Severity.INFO,
            f"{name}: a vision-language model — load it with {auto} and AutoProcessor{cls}; "
            'AutoModelForCausalLM fails on it with "Unrecognized configuration class"',
            evidence=Evidence(file="config.json", value=f"model_type={ctx.model_type}"),
        )
    return Finding(
        "VB204",
        Severity.INFO,
        f"{name}: a text-only language model — load it with {auto} and AutoTokenizer; it cannot take images",
        evidence=Evidence(file="config.json", value=f"model_type={ctx.model_type}"),
    )


def _check_architectures(ctx: Context, mt: str) -> Iterator[Finding]:
    tf = ctx.tf
    for arch in ctx.architectures[:1]:
        if not tf.class_defined(mt, arch):
            expected = sorted(tf.classes_for(mt))
            yield Finding(
                "VB202",
                Severity.WARNING,
                f'architectures names "{arch}", which transformers {tf.version} does not have; the Auto classes '
                "still build from model_type, but tools that use architectures (vLLM, pipelines) fail",
                fix=f'set "architectures": ["{expected[0]}"] in config.json' if expected else "fix architectures",
                evidence=Evidence(file="config.json", value=arch),
            )
            continue
        owners = sorted(
            t
            for name in ("MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES")
            for t, cls in tf.table(name).items()
            if cls == arch
        )
        if owners and mt not in owners:
            expected = sorted(tf.classes_for(mt))
            yield Finding(
                "VB203",
                Severity.WARNING,
                f'architectures names "{arch}" (a {owners[0]} class) but model_type is {mt!r}: the checkpoint was '
                "converted or edited by hand; tools that trust architectures build the wrong model",
                fix=f'set "architectures": ["{expected[0]}"] in config.json' if expected else "fix architectures",
                evidence=Evidence(file="config.json", value=arch),
            )


def _config_id(config: Mapping[str, Any], text: Mapping[str, Any], key: str) -> int | None:
    for source in (config, text):
        for k in (key, _LEGACY_KEYS.get(key, "")):
            value = source.get(k)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return None


def check_token_ids(ctx: Context) -> Iterator[Finding]:
    vocab = ctx.vocab
    if not ctx.config_file.ok or not vocab:
        return
    fam = ctx.family
    if fam is not None and fam.is_vlm:
        for key, token in _QWEN_VISION_TOKENS.items():
            cid = _config_id(ctx.config, ctx.text_config, key)
            if cid is None:
                continue
            tid = vocab.get(token)
            if tid is None or tid != cid:
                have = f"the tokenizer maps {token} to {tid}" if tid is not None else f"the tokenizer has no {token}"
                yield Finding(
                    "VB205",
                    Severity.ERROR,
                    f'config.json {key} is {cid} but {have}: images fail with "Image features and image tokens '
                    'do not match"',
                    fix=f'set "{key}": {tid} in config.json' if tid is not None else "re-download the tokenizer files",
                    evidence=Evidence(file="config.json", value=f"{key}={cid}"),
                )
    vocab_size = ctx.text_config.get("vocab_size", ctx.config.get("vocab_size"))
    top = max(vocab.values(), default=-1)
    if isinstance(vocab_size, int) and top >= vocab_size:
        yield Finding(
            "VB206",
            Severity.ERROR,
            f"the tokenizer has ids up to {top} but vocab_size is {vocab_size}: those tokens index past the "
            'embedding ("index out of range")',
            fix="use the tokenizer that came with these weights (or resize the embeddings and re-save)",
            evidence=Evidence(file="config.json", value=f"vocab_size={vocab_size}"),
        )
    yield from _check_eos(ctx, vocab)


def _check_eos(ctx: Context, vocab: Mapping[str, int]) -> Iterator[Finding]:
    if ctx.family is None or "<|im_end|>" not in vocab:
        return
    gen = ctx.json("generation_config.json")
    source, cfg = ("generation_config.json", gen.mapping) if gen.ok else ("config.json", ctx.text_config)
    eos = cfg.get("eos_token_id")
    ids = {eos} if isinstance(eos, int) else {e for e in eos if isinstance(e, int)} if isinstance(eos, list) else set()
    if ids and vocab["<|im_end|>"] not in ids:
        yield Finding(
            "VB209",
            Severity.WARNING,
            f"{source} eos_token_id {sorted(ids)} lacks <|im_end|> ({vocab['<|im_end|>']}), the token that ends a "
            "chat turn: answers run on to max_new_tokens",
            fix=f'set "eos_token_id": [{vocab["<|im_end|>"]}, {vocab.get("<|endoftext|>", "...")}] in {source}',
            evidence=Evidence(file=source, value=f"eos_token_id={eos}"),
        )


def check_vision_weights(ctx: Context) -> Iterator[Finding]:
    headers = ctx.headers
    if not ctx.is_vlm or not headers or any(isinstance(h, str) for h in headers.values()):
        return
    names = [t for h in headers.values() if isinstance(h, SafetensorsHeader) for t in h.tensors]
    if names and not any(n.startswith(_VISION_PREFIXES) for n in names):
        yield Finding(
            "VB207",
            Severity.ERROR,
            f"config.json describes a vision-language model but none of the {len(names)} tensors belongs to a "
            "vision tower: transformers initialises it randomly and images become noise",
            fix="use the full checkpoint (a text-only export cannot see images), or load it as its text model",
            evidence=Evidence(file=next(iter(headers)), value=f"{len(names)} tensors, no visual.*"),
        )


def check_rope(ctx: Context) -> Iterator[Finding]:
    fam = ctx.family
    if fam is None or not fam.is_vlm or not ctx.config_file.ok:
        return
    text = ctx.text_config
    section = None
    source = "config.json"
    for key in ("rope_parameters", "rope_scaling"):
        for where in (text, ctx.config):
            rope = where.get(key)
            if isinstance(rope, dict) and "mrope_section" in rope:
                section = rope["mrope_section"]
                source = f"{key}.mrope_section"
                break
        if section is not None:
            break
    heads, hidden = text.get("num_attention_heads"), text.get("hidden_size")
    head_dim = text.get("head_dim")
    if not isinstance(head_dim, int):
        head_dim = hidden // heads if isinstance(hidden, int) and isinstance(heads, int) and heads else None
    if head_dim is None:
        return
    if section is None:
        total, shown = _DEFAULT_MROPE_SUM, "missing (transformers' default sums to 64)"
    elif isinstance(section, list) and all(isinstance(s, int) for s in section):
        total, shown = sum(section), str(section)
    else:
        total, shown = -1, repr(section)
    if total * 2 != head_dim:
        yield Finding(
            "VB208",
            Severity.ERROR,
            f"mrope_section {shown} must sum to head_dim/2 = {head_dim // 2}: Qwen2/2.5-VL crash in rotary "
            "embedding (split_with_sizes), Qwen3-VL silently mixes up image positions",
            fix="restore rope_scaling/rope_parameters from the model's repository (never edit mrope_section)",
            evidence=Evidence(file="config.json", value=f"{source}={shown}"),
        )
