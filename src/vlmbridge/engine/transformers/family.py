"""Per-family knowledge the generic engine must not have: what Qwen2-VL, Qwen2.5-VL, Qwen3-VL (dense and MoE)
and text-only models differ in, in one place — as vLLM's model classes implement `SupportsMultiModal`.

- the image placeholder the processor expands per image, and the processor outputs the vision tower takes;
- positions: the Qwen-VL families use M-RoPE (`get_rope_index` on the base model); text models plain positions;
- vision features: every Qwen-VL tower gives one pooled feature row per merged patch; Qwen3-VL adds
  `deepstack_features` (one tensor per deepstack layer) that must travel with them;
- the cache keyword of `forward` (`past_key_values`, or `cache` in newer model code).
The tensor names and shapes each family's checkpoint holds are `vlmbridge.doctor.expected`'s (read without torch).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["IMAGE_INPUTS", "VIDEO_INPUTS", "FamilyAdapter", "adapter_for"]

IMAGE_INPUTS = ("pixel_values", "image_grid_thw")  # what the Qwen-VL processors hand the vision tower
# ... for clips; Qwen2.5-VL adds the seconds per temporal patch, which its M-RoPE positions scale by
VIDEO_INPUTS = ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts")


@dataclass(frozen=True)
class FamilyAdapter:
    model_type: str
    image_token: str | None = "<|image_pad|>"  # None: text-only
    mrope: bool = True
    deepstack: bool = False

    def rope_index(self, model: Any) -> Callable[..., tuple[Any, Any]] | None:
        """The base model's M-RoPE position function (None: plain positions)."""
        return getattr(getattr(model, "model", None), "get_rope_index", None) if self.mrope else None

    @staticmethod
    def cache_keyword(model: Any) -> str:
        return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    @staticmethod
    def vision_encoder(model: Any) -> Any:
        """Whatever owns `get_image_features` (the family's base model)."""
        return model.model

    def split_features(self, out: Any, count: int) -> list[dict[str, Any]]:
        """The vision tower's output for `count` images (or clips) as one entry each (cacheable on its own)."""
        deepstack = getattr(out, "deepstack_features", None) if self.deepstack else None
        items: list[dict[str, Any]] = []
        for j in range(count):
            item: dict[str, Any] = {"pooler_output": out.pooler_output[j].clone()}
            if deepstack is not None:
                item["deepstack_features"] = [layer[j].clone() for layer in deepstack]
            items.append(item)
        return items

    def join_features(self, output_cls: Any, items: list[dict[str, Any]]) -> Any:
        """Per-image entries, in prompt order, as the `mm_encoder_outputs["image"]` object the model takes."""
        fields: dict[str, Any] = {"pooler_output": tuple(p["pooler_output"] for p in items)}
        if items and "deepstack_features" in items[0]:
            layers = len(items[0]["deepstack_features"])
            fields["deepstack_features"] = [tuple(p["deepstack_features"][k] for p in items) for k in range(layers)]
        return output_cls(**fields)


_ADAPTERS = {
    "qwen2_vl": FamilyAdapter("qwen2_vl"),
    "qwen2_5_vl": FamilyAdapter("qwen2_5_vl"),
    "qwen3_vl": FamilyAdapter("qwen3_vl", deepstack=True),
    "qwen3_vl_moe": FamilyAdapter("qwen3_vl_moe", deepstack=True),
}
_TEXT = FamilyAdapter("text", image_token=None, mrope=False)


def adapter_for(model_type: str | None, *, vlm: bool) -> FamilyAdapter:
    """The adapter of a loaded model. Unknown VLMs (remote code) get the Qwen-VL conventions, which they must
    follow to be served at all; text models plain positions."""
    if not vlm:
        return _TEXT
    return _ADAPTERS.get(model_type or "", FamilyAdapter(model_type or "unknown", deepstack=True))
