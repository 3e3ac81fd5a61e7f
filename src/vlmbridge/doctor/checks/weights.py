"""Files & integrity: config.json, weight files, the shard index, each shard's header and length, pickle weights."""

from __future__ import annotations

import pickletools
import zipfile
from collections.abc import Iterator
from pathlib import Path

from vlmbridge.doctor.checks.environment import permission_denied
from vlmbridge.doctor.context import INDEX_FILE, Context
from vlmbridge.doctor.findings import Evidence, Finding, Severity
from vlmbridge.folder import SafetensorsHeader
from vlmbridge.memory import format_bytes

__all__ = ["check_config", "check_pickle", "check_shards", "check_weight_files", "loader_opens", "refused_globals"]

_MAX_PICKLE_BYTES = 64 * 1024 * 1024
# Small files transformers' from_pretrained (model, tokenizer, processor, generation config) or vlmbridge opens.
_LOADED_FILES = frozenset({
    "config.json", "generation_config.json", INDEX_FILE, "pytorch_model.bin.index.json",
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "tokenizer.model", "vocab.txt",
    "spiece.model", "tokenizer.tiktoken", "special_tokens_map.json", "added_tokens.json",
    "preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
    "chat_template.json", "chat_template.jinja", "additional_chat_templates",
})  # fmt: skip
# What torch >= 2.6's weights_only unpickler accepts (torch/_weights_only_unpickler.py `_get_allowed_globals`).
_SAFE_GLOBALS = {
    "collections.OrderedDict", "collections.Counter", "_codecs.encode", "builtins.bytearray", "builtins.set",
    "builtins.complex",
}  # fmt: skip
_SAFE_TORCH_MODULES = (
    "torch",
    "torch._utils",
    "torch._tensor",
    "torch.serialization",
    "torch.storage",
    "torch.nn.parameter",
)


def _names(items: list[str], limit: int = 3) -> str:
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def check_config(ctx: Context) -> Iterator[Finding]:
    cfg = ctx.config_file
    if not cfg.present:
        if not ctx.facts.get("nested_config"):
            yield Finding(
                "VB100",
                Severity.ERROR,
                f"{ctx.path} has no config.json: not a transformers model folder, or the download is incomplete",
                fix="download config.json from the model's repository (huggingface-cli download REPO config.json "
                "--local-dir DIR)",
                evidence=Evidence(file="config.json", value="missing"),
            )
    elif cfg.error == "permission denied reading config.json":
        yield permission_denied(ctx, "config.json")
    elif cfg.error is not None or not isinstance(cfg.value, dict):
        reason = cfg.error or f"top level is a {type(cfg.value).__name__}, not an object"
        yield Finding(
            "VB101",
            Severity.ERROR,
            f"config.json cannot be used: {reason}",
            fix="re-download config.json from the model's repository",
            evidence=Evidence(file="config.json", value=reason[:120]),
        )


def loader_opens(ctx: Context, name: str) -> bool:
    """True for the files loading the model reads (config, weights and index, tokenizer, processor and template
    files, generation config, remote code); a broken link elsewhere in the folder cannot break the load."""
    if name in _LOADED_FILES or name in set((ctx.weight_map or {}).values()):
        return True
    if name.endswith((".safetensors", ".bin")) and name.startswith(("model", "pytorch_model")):
        return True
    return name.endswith(".py") and bool(ctx.auto_map)  # remote code may import any module beside it


def check_weight_files(ctx: Context) -> Iterator[Finding]:
    for name, entry in sorted(ctx.entries.items()):
        if entry.kind != "broken-link":
            continue
        if loader_opens(ctx, name):
            yield Finding(
                "VB115",
                Severity.ERROR,
                f"{name} is a broken symlink ({entry.error}); a copied Hugging Face cache without its blobs?",
                fix="copy with links resolved (cp -rL SRC DST), or re-download with --local-dir",
                evidence=Evidence(file=name, value=entry.error),
            )
        else:
            yield Finding(
                "VB115",
                Severity.WARNING,
                f"{ctx.path / name} is a broken symlink ({entry.error}); loading never opens it, so it does no harm",
                fix=f"remove it (rm {ctx.path / name}) or point it at an existing file",
                evidence=Evidence(file=name, value=entry.error),
            )
    safetensors = ctx.names(".safetensors")
    pickles = [n for n in ctx.names(".bin") if n.startswith(("pytorch_model", "model"))]
    ggufs = ctx.names(".gguf")
    if ggufs:
        yield Finding(
            "VB116",
            Severity.WARNING,
            f"{_names(ggufs)}: GGUF is the llama.cpp/Ollama format; transformers loads safetensors, and vision "
            "GGUFs also need their mmproj projector file",
            fix="use the original safetensors checkpoint here, or serve the GGUF with llama.cpp --mmproj FILE",
            evidence=Evidence(file=ggufs[0]),
        )
    if not safetensors and not pickles:
        yield Finding(
            "VB102",
            Severity.ERROR,
            "no weight files (*.safetensors or pytorch_model*.bin)" + (" — only GGUF" if ggufs else ""),
            fix="download the weight shards and model.safetensors.index.json into the folder",
            evidence=Evidence(value="no *.safetensors"),
        )
    elif pickles and not safetensors:
        allowed = ctx.options.allow_pickle_weights
        yield Finding(
            "VB112",
            Severity.WARNING if allowed else Severity.ERROR,
            f"only pickle weights ({_names(pickles)}): slower to load, and unpickling can run code"
            + (" — allowed by --allow-pickle-weights" if allowed else "; vlmbridge refuses them by default"),
            fix='convert to safetensors (python -c "from transformers import AutoModelForImageTextToText as A; '
            "A.from_pretrained('DIR').save_pretrained('OUT')\"), or pass --allow-pickle-weights after review",
            evidence=Evidence(file=pickles[0]),
        )
    elif pickles and safetensors:
        yield Finding(
            "VB114",
            Severity.INFO,
            f"both pickle ({_names(pickles)}) and safetensors weights: vlmbridge loads only the safetensors",
            fix=f"delete the .bin files to free {format_bytes(sum(ctx.entries[n].size for n in pickles))}",
            evidence=Evidence(file=pickles[0]),
        )


def check_pickle(ctx: Context) -> Iterator[Finding]:
    """torch >= 2.6 loads .bin with weights_only=True: any global outside its allowlist fails the load."""
    if ctx.names(".safetensors"):
        return
    for name in [n for n in ctx.names(".bin") if n.startswith(("pytorch_model", "model"))][:20]:
        try:
            refused = refused_globals(ctx.path / name)
        except PermissionError:
            yield permission_denied(ctx, name)
            continue
        except (OSError, ValueError, zipfile.BadZipFile, RuntimeError):
            continue  # legacy or odd format: not inspectable from its pickle alone
        if refused:
            yield Finding(
                "VB113",
                Severity.ERROR,
                f"{name} pickles {_names(sorted(refused))}, which torch's weights_only loader refuses "
                '("Weights only load failed")',
                fix="convert the state dict to safetensors on a trusted machine, or add the classes with "
                "torch.serialization.add_safe_globals after reviewing them",
                evidence=Evidence(file=name, value=sorted(refused)[0]),
            )


def refused_globals(path: Path) -> set[str]:
    """Globals referenced by a zip-format torch checkpoint's data.pkl that weights_only would refuse.

    Reads only the small pickle, never the tensor storages. Raises on non-zip files."""
    with zipfile.ZipFile(path) as zf:
        member = next((m for m in zf.infolist() if m.filename.endswith("data.pkl")), None)
        if member is None or member.file_size > _MAX_PICKLE_BYTES:
            return set()
        data = zf.read(member)
    found: set[str] = set()
    strings: list[str] = []
    memo: dict[int, str] = {}
    for op, arg, _ in pickletools.genops(data):
        if op.name == "GLOBAL" and isinstance(arg, str):
            found.add(arg.replace(" ", ".").replace("\n", "."))
        elif op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8") and isinstance(arg, str):
            strings.append(arg)
        elif op.name == "MEMOIZE" and strings:
            memo[len(memo)] = strings[-1]
        elif op.name in ("BINPUT", "LONG_BINPUT", "PUT") and isinstance(arg, int) and strings:
            memo[arg] = strings[-1]
        elif op.name in ("BINGET", "LONG_BINGET", "GET") and isinstance(arg, int) and arg in memo:
            strings.append(memo[arg])
        elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
            found.add(f"{strings[-2]}.{strings[-1]}")
    return {g for g in found if g not in _SAFE_GLOBALS and g.rpartition(".")[0] not in _SAFE_TORCH_MODULES}


def check_shards(ctx: Context) -> Iterator[Finding]:
    """Headers parse; each file is exactly as long as its header says; the index agrees with the headers."""
    headers = ctx.headers
    for name, header in headers.items():
        if isinstance(header, str):
            if header == "permission denied":
                yield permission_denied(ctx, name)
            else:
                yield Finding(
                    "VB104",
                    Severity.ERROR,
                    f"{name}: the safetensors header is unreadable ({header}) — a corrupt or non-safetensors file",
                    fix=f"re-download {name}",
                    evidence=Evidence(file=name, value=header[:120]),
                )
        elif header.file_size != header.expected_file_size:
            yield _size_finding(name, header)
    yield from _check_index(ctx)


def _size_finding(name: str, h: SafetensorsHeader) -> Finding:
    diff = h.expected_file_size - h.file_size
    what = (
        f"truncated: {diff:,} bytes ({format_bytes(diff)}) missing — an interrupted download"
        if diff > 0
        else f"{-diff:,} bytes longer than its header declares — a corrupted or appended file"
    )
    return Finding(
        "VB105",
        Severity.ERROR,
        f"{name} is {what} (file {h.file_size:,} bytes, header says {h.expected_file_size:,})",
        fix=f"re-download {name} (huggingface-cli download REPO {name} --local-dir DIR)",
        evidence=Evidence(file=name, value=f"size {h.file_size} != {h.expected_file_size}"),
    )


def _check_index(ctx: Context) -> Iterator[Finding]:
    shards = ctx.names(".safetensors")
    index = ctx.index
    if index.present and not index.ok:
        if index.error and "permission denied" in index.error:
            yield permission_denied(ctx, INDEX_FILE)
            return
        yield Finding(
            "VB106",
            Severity.ERROR,
            f"{INDEX_FILE} is unreadable: {index.error}",
            fix=f"re-download {INDEX_FILE}",
            evidence=Evidence(file=INDEX_FILE),
        )
        return
    weight_map = ctx.weight_map
    if index.present and weight_map is None:
        yield Finding(
            "VB106",
            Severity.ERROR,
            f"{INDEX_FILE} has no weight_map object",
            fix=f"re-download {INDEX_FILE}",
            evidence=Evidence(file=INDEX_FILE, value="weight_map"),
        )
        return
    if weight_map is None:
        if shards and "model.safetensors" not in shards:
            yield Finding(
                "VB109",
                Severity.ERROR,
                f"{len(shards)} safetensors file(s) ({_names(shards)}) but no {INDEX_FILE}: transformers looks "
                "for model.safetensors or the index and finds neither",
                fix=f"download {INDEX_FILE} from the model's repository",
                evidence=Evidence(file=INDEX_FILE, value="missing"),
            )
        elif len(shards) > 1:
            stray = [s for s in shards if s != "model.safetensors"]
            yield _stray(stray, "only model.safetensors is loaded without an index")
        return
    yield from _compare_index(ctx, weight_map, shards)


def _stray(names: list[str], why: str) -> Finding:
    return Finding(
        "VB110",
        Severity.WARNING,
        f"{_names(names)} not loaded: {why} (left from another download or an adapter?)",
        fix=f"remove or move {_names(names)} out of the model folder",
        evidence=Evidence(file=names[0]),
    )


def _compare_index(ctx: Context, weight_map: dict[str, str], shards: list[str]) -> Iterator[Finding]:
    named = sorted(set(weight_map.values()))
    for shard in named:
        if shard not in ctx.entries:
            count = sum(1 for v in weight_map.values() if v == shard)
            yield Finding(
                "VB103",
                Severity.ERROR,
                f"{INDEX_FILE} names {shard} ({count} tensors) but the file does not exist",
                fix=f"download {shard} (huggingface-cli download REPO {shard} --local-dir DIR)",
                evidence=Evidence(file=INDEX_FILE, value=shard),
            )
    stray = [s for s in shards if s not in named]
    if stray:
        yield _stray(stray, f"{INDEX_FILE} does not name it")
    where: dict[str, list[str]] = {}
    good = {n: h for n, h in ctx.headers.items() if isinstance(h, SafetensorsHeader) and n in named}
    for name, header in good.items():
        for tensor in header.tensors:
            where.setdefault(tensor, []).append(name)
    dupes = sorted(t for t, files in where.items() if len(files) > 1)
    if dupes:
        yield Finding(
            "VB111",
            Severity.WARNING,
            f"{len(dupes)} tensor(s) are stored in several shards (e.g. {dupes[0]} in {_names(where[dupes[0]])}); "
            "which copy loads depends on the loader",
            fix="re-download the checkpoint: its shards come from different exports",
            evidence=Evidence(file=where[dupes[0]][0], value=dupes[0]),
        )
    checkable = {t: s for t, s in weight_map.items() if s in good}
    missing = sorted(t for t in checkable if t not in where)
    if missing:
        yield Finding(
            "VB107",
            Severity.ERROR,
            f"{len(missing)} tensor(s) the index lists are in no shard (e.g. {missing[0]}); transformers would "
            "initialise them randomly",
            fix="re-download the shards and the index together (they come from different exports)",
            evidence=Evidence(file=INDEX_FILE, value=missing[0]),
        )
    moved = sorted(t for t, s in checkable.items() if t in where and s not in where[t])
    unlisted = sorted(t for t in where if t not in weight_map)
    if moved or unlisted:
        example = moved[0] if moved else unlisted[0]
        detail = (f"{len(moved)} tensor(s) sit in another shard than the index says" if moved else "") + (
            ("; " if moved else "") + f"{len(unlisted)} tensor(s) in shards are missing from the index"
            if unlisted
            else ""
        )
        yield Finding(
            "VB108",
            Severity.WARNING,
            f"{INDEX_FILE} disagrees with the shard headers: {detail} (e.g. {example}). transformers 5 reads whole "
            "shards and copes; loaders that trust the index (older transformers, vLLM, offloading) do not",
            fix=f"re-download {INDEX_FILE} to match the shards",
            evidence=Evidence(file=INDEX_FILE, value=example),
        )
