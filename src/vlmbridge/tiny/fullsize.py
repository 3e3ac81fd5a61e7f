"""A full-size fake of Qwen/Qwen3-VL-8B-Instruct that takes no disk: real config, real tensor names and shapes,
valid safetensors headers, sparse data.

Tensor names and shapes come from `Qwen3VLForConditionalGeneration` instantiated on the meta device (so they are
transformers' own, not the doctor's tables). Each of the 4 shards holds a real header followed by a hole of the
declared data length: the file has the right size, reads as zeros and occupies a few kilobytes. The small files
are the official repo's (facts file / research notes) with a tokenizer that has the real special-token ids.
Only the doctor and the memory estimator may use this folder: its weights are zeros.
"""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["FULLSIZE_8B_SHARDS", "QWEN_ADDED_TOKENS", "build_fullsize_qwen3_vl_8b", "qwen3_vl_8b_config"]

FULLSIZE_8B_SHARDS = 4
_MAX_SHARD_BYTES = 5_000_000_000  # save_pretrained's 5GB default gives the official 4.90/4.92/5.00/2.72 GB split
# The Qwen vocabulary's added tokens and their ids (151643–151668); the first 14 are special.
QWEN_ADDED_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>",
    "<think>", "</think>",
)  # fmt: skip
_FIRST_ADDED_ID = 151643
_SPECIAL_COUNT = 14
_MEAN_STD = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}


def qwen3_vl_8b_config() -> Any:
    """`Qwen3VLConfig` with Qwen3-VL-8B-Instruct's values (shared/reference/qwen-vl-facts.md)."""
    import transformers

    text = {
        "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 262144,
        "rms_norm_eps": 1e-6, "hidden_act": "silu", "attention_bias": False, "tie_word_embeddings": False,
        "bos_token_id": 151643, "eos_token_id": 151645,
        "rope_parameters": {"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": [24, 20, 20],
                            "mrope_interleaved": True},
    }  # fmt: skip
    vision = {
        "depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16, "out_hidden_size": 4096,
        "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2, "num_position_embeddings": 2304,
        "deepstack_visual_indexes": [8, 16, 24], "hidden_act": "gelu_pytorch_tanh", "in_channels": 3,
    }  # fmt: skip
    return transformers.Qwen3VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=151655,
        video_token_id=151656,
        vision_start_token_id=151652,
        vision_end_token_id=151653,
        tie_word_embeddings=False,
        dtype="bfloat16",
        architectures=["Qwen3VLForConditionalGeneration"],
    )


def _meta_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    import torch
    import transformers

    with torch.device("meta"):
        model = transformers.Qwen3VLForConditionalGeneration(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _split(shapes: dict[str, tuple[int, ...]], dtype_bytes: int) -> list[dict[str, tuple[int, ...]]]:
    shards: list[dict[str, tuple[int, ...]]] = [{}]
    size = 0
    for name, shape in shapes.items():
        nbytes = dtype_bytes
        for d in shape:
            nbytes *= d
        if shards[-1] and size + nbytes > _MAX_SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = shape
        size += nbytes
    return shards


def _write_sparse_shard(path: Path, tensors: dict[str, tuple[int, ...]]) -> int:
    """Write a valid safetensors header and extend the file to the declared length without writing data."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in sorted(tensors):
        nbytes = 2
        for d in tensors[name]:
            nbytes *= d
        header[name] = {"dtype": "BF16", "shape": list(tensors[name]), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes
    with path.open("wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        fh.truncate(8 + len(raw) + offset)  # a hole: the size is right, no blocks are allocated
    return offset


def _write_json(path: Path, data: Any, indent: int = 2) -> None:
    path.write_text(json.dumps(data, indent=indent, ensure_ascii=False), encoding="utf-8")


def _write_tokenizer(out: Path) -> None:
    """A byte-level BPE with the tiny trained merges, padded to the real vocabulary's size and added-token ids."""
    from vlmbridge.tiny.builder import chat_template_for
    from vlmbridge.tiny.tokenizer import QWEN_EXTRA_TOKENS, QWEN_SPECIAL_TOKENS, build_tokenizer

    tiny = build_tokenizer(1024)
    with tempfile.TemporaryDirectory() as tmp:
        tiny.tokenizer.save_pretrained(tmp)
        data = json.loads((Path(tmp) / "tokenizer.json").read_text(encoding="utf-8"))
    skip = set(QWEN_SPECIAL_TOKENS) | set(QWEN_EXTRA_TOKENS)
    vocab = {t: i for t, i in sorted(tiny.vocab.items(), key=lambda kv: kv[1]) if t not in skip}
    vocab = {t: i for i, t in enumerate(vocab)}
    for i in range(len(vocab), _FIRST_ADDED_ID):
        vocab[f"Ġ<fill{i}>"] = i  # stands in for the real vocabulary's entries
    added = [
        {
            "id": _FIRST_ADDED_ID + i,
            "content": t,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": i < _SPECIAL_COUNT,
        }
        for i, t in enumerate(QWEN_ADDED_TOKENS)
    ]
    data["model"]["vocab"] = vocab
    data["added_tokens"] = added
    _write_json(out / "tokenizer.json", data)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in tiny.merges)]
    (out / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    template = chat_template_for("qwen3_vl")
    decoder = {str(a["id"]): {k: v for k, v in a.items() if k != "id"} for a in added}
    _write_json(
        out / "tokenizer_config.json",
        {
            "add_bos_token": False,
            "add_prefix_space": False,
            "added_tokens_decoder": decoder,
            "additional_special_tokens": list(QWEN_ADDED_TOKENS[1:_SPECIAL_COUNT]),
            "bos_token": None,
            "chat_template": template,
            "clean_up_tokenization_spaces": False,
            "eos_token": "<|im_end|>",
            "errors": "replace",
            "model_max_length": 262144,
            "pad_token": "<|endoftext|>",
            "split_special_tokens": False,
            "tokenizer_class": "Qwen2Tokenizer",
            "unk_token": None,
        },
    )
    _write_json(out / "chat_template.json", {"chat_template": template})


def _write_official_small_files(out: Path, config: Any) -> None:
    config.save_pretrained(out)
    _write_json(
        out / "generation_config.json",
        {
            "bos_token_id": 151643,
            "pad_token_id": 151643,
            "do_sample": True,
            "eos_token_id": [151645, 151643],
            "top_k": 20,
            "top_p": 0.8,
            "repetition_penalty": 1.0,
            "temperature": 0.7,
            "transformers_version": "4.56.0",
        },
        indent=4,
    )
    common = {
        "patch_size": 16,
        "temporal_patch_size": 2,
        "merge_size": 2,
        **_MEAN_STD,
        "processor_class": "Qwen3VLProcessor",
    }
    _write_json(
        out / "preprocessor_config.json",
        {
            "size": {"longest_edge": 16777216, "shortest_edge": 65536},
            **common,
            "image_processor_type": "Qwen2VLImageProcessorFast",
        },
        indent=4,
    )
    _write_json(
        out / "video_preprocessor_config.json",
        {
            "size": {"longest_edge": 25165824, "shortest_edge": 4096},
            **common,
            "video_processor_type": "Qwen3VLVideoProcessor",
        },
        indent=4,
    )
    _write_tokenizer(out)


def build_fullsize_qwen3_vl_8b(out: str | Path, *, overwrite: bool = False) -> Path:
    """Write the fake into `out` (created) and return it. Needs torch and transformers; takes seconds, ~10 MB."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    config = qwen3_vl_8b_config()
    shards = _split(_meta_shapes(config), dtype_bytes=2)
    if len(shards) != FULLSIZE_8B_SHARDS:
        raise RuntimeError(f"expected {FULLSIZE_8B_SHARDS} shards, the 5GB split gave {len(shards)}")
    weight_map: dict[str, str] = {}
    total = 0
    for i, tensors in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        total += _write_sparse_shard(out / name, tensors)
        weight_map.update(dict.fromkeys(tensors, name))
    _write_json(
        out / "model.safetensors.index.json",
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
    )
    _write_official_small_files(out, config)
    return out
