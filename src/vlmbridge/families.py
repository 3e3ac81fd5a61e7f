"""Facts about the model families vlmbridge knows by name (see shared/reference/qwen-vl-facts.md).

The loader never uses this table to choose classes — transformers' own auto mappings do that. The table feeds
messages (minimum versions, expected classes), the doctor, and the tiny-checkpoint builder.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["FAMILIES", "MIN_TRANSFORMERS", "Family", "family_for"]


@dataclass(frozen=True)
class Family:
    model_type: str
    display_name: str
    model_class: str
    processor_class: str | None  # None for text-only models
    min_transformers: str
    patch_size: int = 14
    merge_size: int = 2
    # Files of the public reference repo besides weights and config.json.
    official_files: tuple[str, ...] = ()
    official_repo: str = ""

    @property
    def is_vlm(self) -> bool:
        return self.processor_class is not None

    @property
    def image_factor(self) -> int:
        """Image sides are resized to multiples of this (patch × spatial merge)."""
        return self.patch_size * self.merge_size


_QWEN_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")

FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family(
            model_type="qwen2_vl",
            display_name="Qwen2-VL",
            model_class="Qwen2VLForConditionalGeneration",
            processor_class="Qwen2VLProcessor",
            min_transformers="4.45.0",
            patch_size=14,
            official_repo="Qwen/Qwen2-VL-7B-Instruct",
            official_files=(
                "generation_config.json",
                "chat_template.json",
                "preprocessor_config.json",
                *_QWEN_TOKENIZER_FILES,
            ),
        ),
        Family(
            model_type="qwen2_5_vl",
            display_name="Qwen2.5-VL",
            model_class="Qwen2_5_VLForConditionalGeneration",
            processor_class="Qwen2_5_VLProcessor",
            min_transformers="4.49.0",
            patch_size=14,
            official_repo="Qwen/Qwen2.5-VL-7B-Instruct",
            official_files=(
                "generation_config.json",
                "chat_template.json",
                "preprocessor_config.json",
                *_QWEN_TOKENIZER_FILES,
            ),
        ),
        Family(
            model_type="qwen3_vl",
            display_name="Qwen3-VL",
            model_class="Qwen3VLForConditionalGeneration",
            processor_class="Qwen3VLProcessor",
            min_transformers="4.57.0",
            patch_size=16,
            official_repo="Qwen/Qwen3-VL-8B-Instruct",
            official_files=(
                "generation_config.json",
                "chat_template.json",
                "preprocessor_config.json",
                "video_preprocessor_config.json",
                *_QWEN_TOKENIZER_FILES,
            ),
        ),
        Family(
            model_type="qwen3_vl_moe",
            display_name="Qwen3-VL MoE",
            model_class="Qwen3VLMoeForConditionalGeneration",
            processor_class="Qwen3VLProcessor",
            min_transformers="4.57.0",
            patch_size=16,
            official_repo="Qwen/Qwen3-VL-30B-A3B-Instruct",
            official_files=(
                "generation_config.json",
                "chat_template.json",
                "preprocessor_config.json",
                "video_preprocessor_config.json",
                *_QWEN_TOKENIZER_FILES,
            ),
        ),
        Family(
            model_type="qwen2",
            display_name="Qwen2/Qwen2.5 (text)",
            model_class="Qwen2ForCausalLM",
            processor_class=None,
            min_transformers="4.37.0",
            official_repo="Qwen/Qwen2.5-7B-Instruct",
            official_files=("generation_config.json", *_QWEN_TOKENIZER_FILES),
        ),
    )
}

# Minimum transformers release that knows a model_type, for "upgrade to X" messages. Qwen-VL rows come from
# the facts file; the others are the releases that first shipped each architecture.
MIN_TRANSFORMERS: dict[str, str] = {
    **{t: f.min_transformers for t, f in FAMILIES.items()},
    "llama": "4.28.0",
    "mistral": "4.34.0",
    "mixtral": "4.36.0",
    "llava": "4.36.0",
    "qwen2_moe": "4.40.0",
    "phi3": "4.40.0",
    "gemma": "4.38.0",
    "gemma2": "4.42.0",
    "llava_onevision": "4.45.0",
    "mllama": "4.45.0",
    "gemma3": "4.50.0",
    "qwen3": "4.51.0",
    "qwen3_moe": "4.51.0",
    "llama4": "4.51.0",
    "internvl": "4.52.0",
    "glm4v": "4.54.0",
    "qwen3_next": "4.57.0",
}


def family_for(model_type: str | None) -> Family | None:
    return FAMILIES.get(model_type or "")
