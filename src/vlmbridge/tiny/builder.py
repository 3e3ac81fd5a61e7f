"""Build tiny, real, offline checkpoints of the Qwen-VL families (and a text-only Qwen2).

Real architecture classes from the installed transformers, random weights from a fixed seed, a real byte-level
BPE tokenizer with the Qwen special tokens (their ids wired into the config), chat templates that render like
the official ones, real image/video processor configs and safetensors weights.

Layouts:
- ``official``: exactly the file set of the family's public repo (see `families.py`), including the legacy
  flat config and tensor names of Qwen2-VL/Qwen2.5-VL and min/max_pixels processor keys.
- ``transformers``: what ``save_pretrained`` of transformers 5.x writes (processor_config.json,
  chat_template.jinja, …).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any, Literal

from vlmbridge.families import FAMILIES, family_for

__all__ = ["FAMILY_NAMES", "SIZES", "Layout", "Size", "TinySpec", "Variant", "build_tiny_model", "chat_template_for"]

Layout = Literal["official", "transformers"]
Variant = Literal["instruct", "thinking"]
Size = Literal["tiny", "tiny-vllm", "small"]
SIZES: tuple[Size, ...] = ("tiny", "tiny-vllm", "small")
FAMILY_NAMES = tuple(FAMILIES)

# Official sampling defaults of each family's generation_config.json (facts file + the public repos).
_GENERATION_DEFAULTS: dict[str, dict[str, Any]] = {
    "qwen2_vl": {
        "do_sample": True,
        "repetition_penalty": 1.05,
        "temperature": 0.1,
        "top_p": 0.001,
        "top_k": 1,
    },
    "qwen2_5_vl": {
        "do_sample": True,
        "repetition_penalty": 1.05,
        "temperature": 0.1,
        "top_p": 0.001,
        "top_k": 1,
    },
    "qwen3_vl": {"do_sample": True, "top_k": 20, "top_p": 0.8, "repetition_penalty": 1.0, "temperature": 0.7},
    "qwen3_vl_moe": {
        "do_sample": True,
        "top_k": 20,
        "top_p": 0.8,
        "repetition_penalty": 1.0,
        "temperature": 0.7,
    },
    "qwen2": {"do_sample": True, "repetition_penalty": 1.05, "temperature": 0.7, "top_p": 0.8, "top_k": 20},
}
_TEMPLATE_FILE = {
    "qwen2_vl": "qwen2_vl.jinja",
    "qwen2_5_vl": "qwen2_vl.jinja",
    "qwen3_vl": "qwen3_vl.jinja",
    "qwen3_vl_moe": "qwen3_vl.jinja",
    "qwen2": "qwen2.jinja",
}
_MODEL_MAX_LENGTH = {"qwen2_vl": 32768, "qwen2_5_vl": 131072, "qwen3_vl": 262144, "qwen3_vl_moe": 262144}
_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass(frozen=True)
class TinySpec:
    family: str = "qwen3_vl"
    size: Size = "tiny"
    shards: int = 1
    layout: Layout = "transformers"
    seed: int = 0


@dataclass(frozen=True)
class _Dims:
    vocab: int
    hidden: int
    layers: int
    inter: int
    heads: int
    kv_heads: int
    head_dim: int
    v_depth: int
    v_hidden: int
    v_inter: int
    v_heads: int
    experts: int
    moe_inter: int


_DIMS: dict[str, _Dims] = {
    # ~0.3 M parameters: loads in a fraction of a second.
    "tiny": _Dims(1024, 64, 2, 128, 4, 2, 16, 2, 32, 64, 2, 4, 32),
    # tiny with 32-dim attention heads: vLLM's CPU attention takes head sizes 32, 64, 80, … only (not 16).
    "tiny-vllm": _Dims(1024, 64, 2, 128, 2, 1, 32, 2, 32, 64, 2, 4, 32),
    # ~30 M parameters: for benchmarks (close to the 29.7 M model the reference figures were measured on).
    "small": _Dims(4096, 384, 8, 1536, 6, 2, 64, 4, 256, 1024, 4, 8, 384),
}


def chat_template_for(family: str, variant: Variant = "instruct") -> str:
    name = "qwen3_vl_thinking.jinja" if variant == "thinking" else _TEMPLATE_FILE[family]
    return files("vlmbridge.tiny").joinpath("templates", name).read_text(encoding="utf-8")


def _mrope_section(head_dim: int) -> list[int]:
    # Sections of the rotary half-dimension for (temporal, height, width); real 128-dim heads use [24, 20, 20].
    half = head_dim // 2
    t = half * 3 // 8
    h = (half - t) // 2
    return [t, h, half - t - h]


def _config(spec: TinySpec, ids: dict[str, int], vocab_size: int) -> Any:
    import transformers

    d = _DIMS[spec.size]
    fam = spec.family
    text: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": d.hidden,
        "intermediate_size": d.inter,
        "num_hidden_layers": d.layers,
        "num_attention_heads": d.heads,
        "num_key_value_heads": d.kv_heads,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }
    vision_ids: dict[str, Any] = {
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
    }
    if fam == "qwen2":
        return transformers.Qwen2Config(
            **text,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6},
            tie_word_embeddings=True,
            dtype="bfloat16",
            max_window_layers=d.layers,
        )
    head_dim = d.hidden // d.heads
    rope: dict[str, Any] = {"rope_type": "default", "mrope_section": _mrope_section(head_dim)}
    cls: Any
    vision: dict[str, Any]
    if fam in ("qwen2_vl", "qwen2_5_vl"):
        text["rope_parameters"] = {**rope, "rope_theta": 1e6}
        if fam == "qwen2_vl":
            vision = {
                "depth": d.v_depth, "embed_dim": d.v_hidden, "hidden_size": d.hidden, "num_heads": d.v_heads,
                "mlp_ratio": 4, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
            }  # fmt: skip
            cls = transformers.Qwen2VLConfig
        else:
            vision = {
                "depth": d.v_depth, "hidden_size": d.v_hidden, "intermediate_size": d.v_inter,
                "num_heads": d.v_heads, "out_hidden_size": d.hidden, "patch_size": 14, "spatial_merge_size": 2,
                "temporal_patch_size": 2, "window_size": 112, "fullatt_block_indexes": [d.v_depth - 1],
            }  # fmt: skip
            cls = transformers.Qwen2_5_VLConfig
        return cls(text_config=text, vision_config=vision, **vision_ids, tie_word_embeddings=False, dtype="bfloat16")
    # Qwen3-VL (dense and MoE)
    text.update(head_dim=head_dim, rope_parameters={**rope, "rope_theta": 5e6, "mrope_interleaved": True})
    vision = {
        "depth": d.v_depth, "hidden_size": d.v_hidden, "intermediate_size": d.v_inter, "num_heads": d.v_heads,
        "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": d.hidden,
        "num_position_embeddings": 256, "deepstack_visual_indexes": list(range(min(3, d.v_depth))),
    }  # fmt: skip
    if fam == "qwen3_vl_moe":
        text.update(
            num_experts=d.experts,
            num_experts_per_tok=2,
            moe_intermediate_size=d.moe_inter,
            decoder_sparse_step=1,
        )
        if spec.size == "tiny-vllm":  # vLLM's Qwen3-VL-MoE reads it (the official config carries it); transformers not
            text["norm_topk_prob"] = True
        cls = transformers.Qwen3VLMoeConfig
    else:
        cls = transformers.Qwen3VLConfig
    return cls(text_config=text, vision_config=vision, **vision_ids, tie_word_embeddings=False, dtype="bfloat16")


def _processor_parts(family: str, tokenizer: Any) -> tuple[Any, Any]:
    """(image processor, video processor) configured like the family's official preprocessor files."""
    from transformers import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    video: Any
    if family in ("qwen3_vl", "qwen3_vl_moe"):
        image = Qwen2VLImageProcessor(
            patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3,
            size={"shortest_edge": 65536, "longest_edge": 16777216},
        )  # fmt: skip
        video = Qwen3VLVideoProcessor(
            patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3,
            size={"shortest_edge": 4096, "longest_edge": 25165824},
        )  # fmt: skip
        return image, video
    image = Qwen2VLImageProcessor(
        patch_size=14, temporal_patch_size=2, merge_size=2, image_mean=_CLIP_MEAN, image_std=_CLIP_STD,
        size={"shortest_edge": 3136, "longest_edge": 12845056},
    )  # fmt: skip
    video = Qwen2VLVideoProcessor(
        patch_size=14, temporal_patch_size=2, merge_size=2, image_mean=_CLIP_MEAN, image_std=_CLIP_STD,
        size={"shortest_edge": 3136, "longest_edge": 12845056},
    )  # fmt: skip
    return image, video


def _save_sharded(model: Any, staging: Path, shards: int) -> None:
    """save_pretrained into exactly `shards` files, searching transformers' own max_shard_size for it."""
    if shards == 1:
        model.save_pretrained(staging)
        return
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())

    def save(limit: int) -> int:
        for f in staging.iterdir():
            f.unlink()
        model.save_pretrained(staging, max_shard_size=limit)
        return len(list(staging.glob("*.safetensors")))

    lo, hi = 1, total
    while lo < hi:  # the shard count only falls as the limit grows
        mid = (lo + hi) // 2
        if save(mid) <= shards:
            hi = mid
        else:
            lo = mid + 1
    if save(lo) != shards:
        raise ValueError(f"cannot split this model into exactly {shards} shards; try fewer")


def _write_json(path: Path, data: Any, indent: int = 2) -> None:
    path.write_text(json.dumps(data, indent=indent, ensure_ascii=False) + "\n", encoding="utf-8")


def build_tiny_model(
    out: str | Path,
    family: str = "qwen3_vl",
    *,
    size: Size = "tiny",
    shards: int = 1,
    layout: Layout = "transformers",
    seed: int = 0,
    overwrite: bool = False,
    variant: Variant = "instruct",
) -> Path:
    """Write a tiny checkpoint of `family` to `out` and return the folder.

    `variant="thinking"` (Qwen3-VL families) uses the Thinking template, whose answers open with `<think>`.
    """
    import torch
    import transformers

    fam = family_for(family)
    if fam is None:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILY_NAMES)}")
    if size not in _DIMS:
        raise ValueError(f"unknown size {size!r}; choose {', '.join(SIZES)}")
    if layout not in ("official", "transformers"):
        raise ValueError(f"unknown layout {layout!r}; choose official or transformers")
    if shards < 1:
        raise ValueError("shards must be >= 1")
    if variant == "thinking" and family not in ("qwen3_vl", "qwen3_vl_moe"):
        raise ValueError("the thinking variant exists for qwen3_vl and qwen3_vl_moe only")
    spec = TinySpec(family=family, size=size, shards=shards, layout=layout, seed=seed)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)

    from vlmbridge.tiny.tokenizer import build_tokenizer

    tiny_tok = build_tokenizer(_DIMS[size].vocab)
    tok = tiny_tok.tokenizer
    tok.chat_template = chat_template_for(family, variant)
    if family in _MODEL_MAX_LENGTH:
        tok.model_max_length = _MODEL_MAX_LENGTH[family]
    ids = {t: tiny_tok.token_id(t) for t in tiny_tok.vocab if t.startswith("<|")}
    config = _config(spec, ids, vocab_size=len(tok))

    torch.manual_seed(seed)
    auto: Any = transformers.AutoModelForImageTextToText if fam.is_vlm else transformers.AutoModelForCausalLM
    model = auto.from_config(config, dtype=torch.bfloat16)
    gen = transformers.GenerationConfig(  # type: ignore[no-untyped-call]
        bos_token_id=ids["<|endoftext|>"],
        pad_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        **_GENERATION_DEFAULTS[family],
    )
    if variant == "thinking":  # the Thinking repos' recommended sampling
        gen.temperature, gen.top_p = 1.0, 0.95
    model.generation_config = gen
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        staging = Path(tmp)
        _save_sharded(model, staging, shards)
        if fam.is_vlm:
            image_proc, video_proc = _processor_parts(family, tok)
            processor_cls = getattr(transformers, fam.processor_class or "")
            processor = processor_cls(
                image_processor=image_proc,
                tokenizer=tok,
                video_processor=video_proc,
                chat_template=tok.chat_template,
            )
        if layout == "transformers":
            (processor if fam.is_vlm else tok).save_pretrained(staging)
            for f in staging.iterdir():
                shutil.move(str(f), out / f.name)
        else:
            _write_official(out, staging, family, tiny_tok, processor if fam.is_vlm else None)
    if family == "qwen3_vl_moe" and size == "tiny-vllm":
        _public_expert_layout(out)
    written = len(list(out.glob("*.safetensors")))
    if written != shards:
        raise RuntimeError(f"expected {shards} weight file(s), transformers wrote {written}")
    return out


def _write_official(out: Path, staging: Path, family: str, tiny_tok: Any, processor: Any | None) -> None:
    """Lay the staged checkpoint out exactly like the family's public repo."""
    for f in staging.glob("*.safetensors"):
        shutil.move(str(f), out / f.name)
    index = staging / "model.safetensors.index.json"
    if index.exists():
        shutil.move(str(index), out / index.name)
    config = json.loads((staging / "config.json").read_text(encoding="utf-8"))
    gen = json.loads((staging / "generation_config.json").read_text(encoding="utf-8"))
    if family in ("qwen2_vl", "qwen2_5_vl"):
        config = _legacy_qwen2_vl_config(config)
        _rename_tensors(out, _legacy_qwen2_vl_name)
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", gen)

    tok = tiny_tok.tokenizer
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tok.save_pretrained(tmp)
        shutil.move(str(Path(tmp) / "tokenizer.json"), out / "tokenizer.json")
        tok_cfg = json.loads((Path(tmp) / "tokenizer_config.json").read_text(encoding="utf-8"))
    tok_cfg.pop("backend", None)
    tok_cfg.update(errors="replace", clean_up_tokenization_spaces=False, split_special_tokens=False)
    tok_cfg["chat_template"] = tok.chat_template  # the official repos also embed the template here
    _write_json(out / "tokenizer_config.json", tok_cfg)
    tiny_tok.write_vocab_files(out)

    if processor is None:
        return
    fam = FAMILIES[family]
    _write_json(out / "chat_template.json", {"chat_template": tok.chat_template})
    image = processor.image_processor
    pre: dict[str, Any]
    if family in ("qwen2_vl", "qwen2_5_vl"):
        # Official Qwen2/2.5-VL files use the flat min/max_pixels keys and ship no video config.
        pre = {
            "min_pixels": image.size["shortest_edge"], "max_pixels": image.size["longest_edge"],
            "patch_size": image.patch_size, "temporal_patch_size": image.temporal_patch_size,
            "merge_size": image.merge_size, "image_mean": list(image.image_mean), "image_std": list(image.image_std),
            "image_processor_type": "Qwen2VLImageProcessor", "processor_class": fam.processor_class,
        }  # fmt: skip
        _write_json(out / "preprocessor_config.json", pre)
        return
    common = {
        "patch_size": image.patch_size, "temporal_patch_size": image.temporal_patch_size,
        "merge_size": image.merge_size, "image_mean": list(image.image_mean), "image_std": list(image.image_std),
        "processor_class": fam.processor_class,
    }  # fmt: skip
    _write_json(
        out / "preprocessor_config.json",
        {"size": dict(image.size), **common, "image_processor_type": "Qwen2VLImageProcessorFast"},
        indent=4,
    )
    video = processor.video_processor
    _write_json(
        out / "video_preprocessor_config.json",
        {"size": dict(video.size), **common, "video_processor_type": type(video).__name__},
        indent=4,
    )


def _legacy_qwen2_vl_config(config: dict[str, Any]) -> dict[str, Any]:
    """The flat config of the public Qwen2/2.5-VL repos: text fields at top level, mrope under rope_scaling."""
    text = dict(config.pop("text_config"))
    for key in ("model_type", "architectures", "dtype"):
        text.pop(key, None)
    rope = text.pop("rope_parameters", {}) or {}
    flat = {**text, **config}
    flat["rope_theta"] = rope.get("rope_theta", 1e6)
    flat["rope_scaling"] = {"type": "mrope", "mrope_section": rope.get("mrope_section")}
    flat["torch_dtype"] = flat.pop("dtype", "bfloat16")  # written by transformers < 4.56
    vision = flat.get("vision_config", {})
    vision.pop("rope_parameters", None)
    return flat


def _legacy_qwen2_vl_name(name: str) -> str:
    # Public Qwen2/2.5-VL shards predate the language_model/visual nesting of transformers >= 4.52.
    if name.startswith("model.language_model."):
        return "model." + name.removeprefix("model.language_model.")
    if name.startswith("model.visual."):
        return "visual." + name.removeprefix("model.visual.")
    return name


def _rename_tensors(folder: Path, rename: Any) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as fh:
            metadata = fh.metadata() or {"format": "pt"}
            tensors = {rename(k): fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
        save_file(tensors, str(shard), metadata=metadata)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text(encoding="utf-8"))
        data["weight_map"] = {rename(k): v for k, v in data["weight_map"].items()}
        _write_json(index, data)


def _public_expert_layout(folder: Path) -> None:
    """Fused MoE expert tensors as the public Qwen3-VL-MoE repos store them ([experts, in, out]), which vLLM loads;
    transformers 5 saves its own transposed layout and loads either (its converter transposes only on a mismatch)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as fh:
            metadata = fh.metadata() or {"format": "pt"}
            tensors = {
                k: fh.get_tensor(k).transpose(1, 2).contiguous()
                if k.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj"))
                else fh.get_tensor(k)
                for k in fh.keys()  # noqa: SIM118
            }
        save_file(tensors, str(shard), metadata=metadata)
