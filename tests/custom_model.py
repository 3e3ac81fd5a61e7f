"""A tiny custom architecture shipped as remote code (config + modeling classes in the folder, `auto_map`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

CONFIG_PY = """
from transformers import PretrainedConfig


class TinyCustomConfig(PretrainedConfig):
    model_type = "tinycustom"

    def __init__(self, vocab_size=1024, hidden_size=32, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        super().__init__(**kwargs)
"""

MODELING_PY = '''
import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_tinycustom import TinyCustomConfig


class TinyCustomForCausalLM(PreTrainedModel, GenerationMixin):
    """Embeddings, a running mean over the context (kept in the KV cache), and an output head."""

    config_class = TinyCustomConfig
    _no_split_modules = []

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=None, logits_to_keep=0, **kwargs):
        h = self.embed(input_ids)
        state = h.unsqueeze(1)
        if past_key_values is not None:
            state, _ = past_key_values.update(state, state, 0)
        context = state[:, 0]
        if attention_mask is not None:
            mask = attention_mask[:, -context.shape[1]:].unsqueeze(-1).to(context.dtype)
            pooled = (context * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1)
        else:
            pooled = context.mean(1, keepdim=True)
        logits = self.head(h + pooled)
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return CausalLMOutputWithPast(logits=logits, past_key_values=past_key_values)
'''


def build_custom_model(out: Path, tokenizer_from: Path) -> Path:
    """A folder whose model needs remote code; tokenizer files are borrowed from a tiny qwen2 checkpoint."""
    import torch

    out.mkdir(parents=True)
    (out / "configuration_tinycustom.py").write_text(CONFIG_PY)
    (out / "modeling_tinycustom.py").write_text(MODELING_PY)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "generation_config.json"):
        shutil.copy(tokenizer_from / name, out / name)
    vocab = json.loads((tokenizer_from / "config.json").read_text())["vocab_size"]
    config = {
        "model_type": "tinycustom",
        "architectures": ["TinyCustomForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_tinycustom.TinyCustomConfig",
            "AutoModelForCausalLM": "modeling_tinycustom.TinyCustomForCausalLM",
        },
        "vocab_size": vocab,
        "hidden_size": 32,
        "dtype": "float32",
    }
    (out / "config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    from safetensors.torch import save_file

    tensors = {"embed.weight": torch.randn(vocab, 32) * 0.5, "head.weight": torch.randn(vocab, 32) * 0.5}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out
