"""Catalogue of known failure messages: pattern → cause, fix and the doctor check that sees it beforehand.

Used by `vlmbridge explain` and by the loader and server to log load failures with their classified cause.
Rows come from shared/reference/errors.md (the field report's table and public issue trackers) plus failures
reproduced with transformers 5.24 on broken tiny checkpoints. Order matters: specific patterns come first, so
`classify` returns the most specific entry for a whole traceback.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["CATALOGUE", "Entry", "Match", "classify", "classify_all", "explain"]

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_FLAGS = re.IGNORECASE | re.MULTILINE


@dataclass(frozen=True)
class Entry:
    code: str  # stable slug, e.g. "vlm-loaded-as-causal-lm"
    patterns: tuple[str, ...]  # regexes, searched case-insensitively
    cause: str
    fix: str
    doctor_check: str | None = None  # doctor finding code that detects it before loading
    source: str = ""
    related: tuple[str, ...] = ()  # other doctor codes that lead to the same message

    @property
    def doctor_checks(self) -> tuple[str, ...]:
        return ((self.doctor_check,) if self.doctor_check else ()) + self.related

    def search(self, text: str) -> re.Match[str] | None:
        for pattern in self.patterns:
            found = re.search(pattern, text, _FLAGS)
            if found:
                return found
        return None

    def matches(self, text: str) -> bool:
        return self.search(_clean(text)) is not None


@dataclass(frozen=True)
class Match:
    entry: Entry
    matched: str  # the text the pattern matched, trimmed to one line


def _e(
    code: str,
    patterns: tuple[str, ...],
    cause: str,
    fix: str,
    check: str | None,
    source: str = "",
    related: tuple[str, ...] = (),
) -> Entry:
    return Entry(code=code, patterns=patterns, cause=cause, fix=fix, doctor_check=check, source=source, related=related)


CATALOGUE: tuple[Entry, ...] = (
    _e("vlm-loaded-as-causal-lm",
       (r"Unrecognized configuration class .*for this kind of AutoModel: AutoModelForCausalLM",),
       "a vision-language model was loaded with the text-only AutoModelForCausalLM class",
       "load it with AutoModelForImageTextToText (vlmbridge's loader does this) and its AutoProcessor",
       "VB204", "ms-swift#3001, QwenLM/Qwen3-VL#157", ("VB203",)),
    _e("model-type-missing",
       (r"Unrecognized model in .*Should have a `?model_type`? key",),
       "config.json is missing or has no model_type, so transformers cannot tell which architecture it is",
       "download config.json from the model's repository (check the path holds config.json)", "VB200",
       "transformers", ("VB100", "VB606")),
    _e("config-invalid-json",
       (r"It looks like the config file at .* is not a valid JSON file",),
       "a config file (config.json, preprocessor_config.json, …) is corrupt or not JSON",
       "re-download the file the message names", "VB101", "transformers", ("VB134", "VB121")),
    _e("transformers-too-old",
       (r"KeyError: '(qwen2_vl|qwen2_5_vl|qwen3_vl|qwen3_vl_moe)'", r"does not recognize this architecture",
        r"model type `?\w+`? but Transformers does not recognize"),
       "the installed transformers predates this architecture (or model_type is misspelled)",
       'pip install -U "transformers>=4.57.0" (Qwen3-VL; Qwen2.5-VL needs 4.49, Qwen2-VL 4.45)',
       "VB201", "transformers#34161, LlamaFactory#6784, ComfyUI-QwenVL#30"),
    _e("tokenizer-class-unknown",
       (r"Tokenizer class \w+ does not exist or is not currently imported", r"KeyError: 'qwen'",
        r"not found in Tokenizer", r"tokenizer class not found"),
       "the tokenizer class is not registered: transformers is too old for the model, or the tokenizer is "
       "remote code (Qwen-VL v1's QWenTokenizer needs trust_remote_code and tiktoken)",
       "upgrade transformers to the family's minimum; for Qwen-VL v1 allow its remote code and pip install tiktoken",
       "VB201", "field report"),
    _e("no-attribute-visual",
       (r"object has no attribute '(visual|vision_tower|vision_model)'",),
       "the checkpoint was loaded with a text-only class, or with a transformers too old for its vision tower",
       "upgrade transformers and load with AutoModelForImageTextToText (the family's *ForConditionalGeneration)",
       "VB204", "field report"),
    _e("safetensors-truncated",
       (r"MetadataIncompleteBuffer", r"incomplete metadata, file not fully covered"),
       "a safetensors shard is not as long as its header says (interrupted or partial download)",
       "re-download that shard and compare its size with the header (vlmbridge doctor names it)",
       "VB105", "common"),
    _e("safetensors-header-corrupt",
       (r"Error while deserializing header: (?!incomplete)", r"HeaderTooLarge", r"HeaderTooSmall", r"InvalidHeader"),
       "a .safetensors file does not start with a valid header: corrupt, an HTML error page, or a Git LFS pointer",
       "re-download the file (git lfs pull, or huggingface-cli download REPO FILE --local-dir DIR)",
       "VB104", "common"),
    _e("shard-missing",
       (r"No such file or directory:? .*\.safetensors", r"FileNotFoundError.*\.safetensors"),
       "model.safetensors.index.json names a shard that is not in the folder (incomplete download)",
       "download the missing shard; vlmbridge doctor lists every missing one", "VB103", "common", ("VB115",)),
    _e("weights-missing",
       (r"Error no file named (model\.safetensors|pytorch_model\.bin)", r"no file named .*safetensors.* found in"),
       "no weights transformers can find: no model.safetensors, no index for the shards, or no weights at all",
       "download model.safetensors.index.json (or model.safetensors) into the folder", "VB102", "transformers",
       ("VB109",)),
    _e("image-processor-missing",
       (r"Can't load image processor for",),
       "the folder has no preprocessor_config.json (or processor_config.json with an image processor)",
       "download preprocessor_config.json from the model's repository", "VB130", "transformers"),
    _e("processor-type-unrecognized",
       (r"Unrecognized (image|video) processor in", r"Should have a[n]? `?(image|video)_processor_type`? key"),
       "the processor config names a class this transformers does not have (early Qwen2.5-VL configs said "
       "Qwen2_5_VLImageProcessor)",
       'set "image_processor_type": "Qwen2VLImageProcessor" in preprocessor_config.json, or re-download it',
       "VB131", "QwenLM/Qwen3-VL#777"),
    _e("processor-size-keys",
       (r"size`? (dict )?must contain 'shortest_edge' and 'longest_edge' keys",
        r"size must have one of the following set of keys"),
       "old min_pixels/max_pixels (or height/width) keys inside `size` with a newer Qwen-VL processor",
       'write the budget as "size": {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}',
       "VB132", "unsloth#1747, transformers#37811"),
    _e("image-tokens-mismatch",
       (r"(Image|Video) features and (image|video) tokens do not match",),
       "the prompt's image placeholders do not match the image features: the chat template was not applied, the "
       "prompt was truncated inside an image, or config.json's image_token_id differs from the tokenizer's",
       "build inputs with processor.apply_chat_template, never truncate inside an image, and check the token ids",
       "VB205", "QwenLM/Qwen3-VL#556", ("VB120",)),
    _e("vocab-size-mismatch",
       (r"index out of range in self", r"Padding_idx must be within num_embeddings"),
       "token ids reach past the embedding table: the tokenizer does not belong to these weights",
       "use the tokenizer files that came with the checkpoint", "VB206", "transformers"),
    _e("vision-weights-missing",
       (r"were not initialized from the model checkpoint.*(visual|vision)",
        r"tensors missing and \d+ of the wrong shape"),
       "weights the architecture needs are missing (e.g. a text-only export of a VLM): they would be random",
       "use the complete checkpoint that matches config.json", "VB207", "transformers", ("VB107", "VB117", "VB118")),
    _e("tensor-shape-mismatch",
       (r"ignore_mismatched_sizes.{0,20}to .?False.?, thus raising an error",
        r"size mismatch for [\w.]+: copying a param"),
       "a tensor in the checkpoint has another shape than config.json implies (an edited config or a bad conversion)",
       "restore config.json from the model's repository, or re-download or re-convert the shard named by doctor",
       "VB118", "transformers"),
    _e("mrope-section-mismatch",
       (r"split_with_sizes expects split_sizes to sum exactly to",),
       "rope mrope_section does not sum to head_dim/2 (a hand-edited or mismatched config)",
       "restore rope_scaling/rope_parameters from the model's repository", "VB208", "transformers"),
    _e("rope-scaling-keys",
       (r"Unrecognized keys in `?rope_scaling`?",),
       "transformers and the config disagree on rope_scaling (version mismatch or a hand-edited config)",
       "use matching transformers/engine versions and the repository's config; do not edit rope_scaling",
       "VB208", "QwenLM/Qwen3-VL#223"),
    _e("prompt-too-long-images",
       (r"decoder prompt \(length \d+\) is longer than the maximum model length",
        r"longer than the maximum model length"),
       "large images become thousands of tokens and overflow the context",
       "cap the pixel budget (--max-pixels) or raise the context length", "VB507", "vllm"),
    _e("encoder-cache-too-small",
       (r"exceeds the pre-allocated encoder cache size",),
       "the engine's encoder cache was sized for fewer or smaller images",
       "cap the pixel budget per image, or raise the engine's multimodal limits", "VB507", "vllm#34040"),
    _e("kv-cache-too-small",
       (r"To serve at least one request with the model's max seq len", r"larger than the available KV cache memory"),
       "the KV cache for the configured context does not fit next to the weights",
       "lower the context length, quantize, or use a device with more memory", "VB505", "vllm"),
    _e("out-of-memory",
       (r"CUDA out of memory", r"OutOfMemoryError", r"DefaultCPUAllocator: can't allocate memory",
        r"not enough memory: you tried to allocate"),
       "weights + KV cache + vision activations exceed the device's memory",
       "plan memory with vlmbridge doctor --gpu-memory SIZE; use 8-bit/4-bit/FP8; cap image pixels and context",
       "VB504", "field report", ("VB505",)),
    _e("awq-tp-misaligned",
       (r"not aligned with the quantized weight shape", r"not divisible by min_thread_k"),
       "the AWQ/GPTQ group size × tensor-parallel size does not divide the intermediate size",
       "use a smaller tensor-parallel size (doctor lists the ones that divide), GPTQ, or a re-padded checkpoint",
       "VB407", "QwenLM/Qwen3-VL#831"),
    _e("engine-too-old",
       (r"Model architectures \[.*\] are not supported for now",),
       "the serving engine predates this architecture (or config.json's architectures is wrong)",
       "upgrade the engine (e.g. pip install -U vllm) and check architectures in config.json", "VB202", "vllm#12502",
       ("VB203",)),
    _e("flash-attn-unusable",
       (r"FlashAttention\d? has been toggled on, but it cannot be used", r"flash_attn.*undefined symbol",
        r"undefined symbol.*flash", r"No module named 'flash_attn'"),
       "flash-attn is missing, built for another torch/CUDA, or the device cannot run it",
       "install the wheel matching torch and CUDA, or use attn_implementation=sdpa", "VB403", "flash-attention#1583"),
    _e("remote-code-required",
       (r"requires you to execute the configuration file in that repo", r"contains custom code which must be executed",
        r"pass the argument `?trust_remote_code=True`?"),
       "the checkpoint has auto_map (remote code) that must run to build the model",
       "review the .py files, then allowlist that folder with its sha256 pins (vlmbridge doctor prints the setting)",
       "VB301", "transformers", ("VB302", "VB303", "VB304")),
    _e("gguf-without-mmproj",
       (r"this model is missing data required for image input", r"image input is not supported.*mmproj",
        r"\bmmproj\b"),
       "a GGUF vision model without its vision projector (mmproj) file",
       "load the matching mmproj (llama.cpp --mmproj FILE), or use the safetensors checkpoint",
       "VB116", "ollama#11254"),
    _e("pickle-weights-only",
       (r"Weights only load failed", r"UnpicklingError"),
       "a .bin pickle holds objects outside torch's weights_only allow-list (torch >= 2.6 default)",
       "convert the weights to safetensors, or allow the classes explicitly after reviewing the file",
       "VB113", "torch 2.6"),
    _e("fp8-dequantized",
       (r"default to dequantizing the model to bf16", r"FP8 quantized models is only supported on GPUs with compute"),
       "an FP8 checkpoint on a GPU below compute capability 8.9 (or on CPU) is dequantized to bf16: 2× memory",
       "use the bf16/AWQ/GPTQ checkpoint on this device, or a GPU with compute capability >= 8.9", "VB402",
       "transformers 5.x"),
    _e("chat-template-missing",
       (r"does not have a chat template", r"chat_template is not set", r"Cannot use (apply_)?chat_template"),
       "no chat template where the processor/tokenizer looks (chat_template.json / .jinja / tokenizer_config.json)",
       "download chat_template.json (VLMs) or use the -Instruct checkpoint", "VB123", "transformers"),
    _e("torchvision-missing",
       (r"requires the Torchvision library", r"No module named 'torchvision'"),
       "torchvision is not installed; transformers 5's Qwen-VL image/video processors need it",
       "pip install torchvision (matching your torch)", "VB404", "transformers"),
    _e("accelerate-missing",
       (r"requires `?accelerate`?", r"No module named 'accelerate'"),
       "accelerate is not installed; device_map loading and most quantizers need it", "pip install accelerate",
       "VB405", "transformers"),
    _e("quantization-package-missing",
       (r"requires (the )?(gptqmodel|optimum|bitsandbytes|compressed.tensors|auto.?awq)",
        r"No module named '(bitsandbytes|gptqmodel|compressed_tensors|optimum|awq)'"),
       "the checkpoint's quantization_config needs a package that is not installed",
       "pip install the package the message names (vlmbridge doctor lists them)", "VB400", "transformers"),
    _e("tiktoken-missing",
       (r"No module named 'tiktoken'",),
       "Qwen-VL v1 remote code tokenizes with tiktoken", "pip install tiktoken", "VB409", "Qwen-VL v1"),
    _e("unsupported-modal-input",
       (r"Unsupported modal input", r"images? (are|is|were) (being )?ignored",
        r"does not support (image|vision) input"),
       "the loader is text-only: no processor was loaded and image parts were dropped",
       "load the processor and send images through the chat template; in Dify switch Vision Support on",
       "VB204", "field report"),
    _e("dify-files-url-empty",
       (r"relative_file_url", r"image URL is a relative link \(/files/", r"FILES_URL is empty",
        r"Invalid URL '/files/[^']*': No scheme supplied"),
       "Dify sent the picture as a relative /files/… link (its FILES_URL is empty), which no model server can fetch",
       "set FILES_URL in Dify's docker/.env to an address the model server can reach (docker-compose: "
       "FILES_URL=http://api:5001), run docker compose up -d, and allow that host (vlmbridge --allow-image-host api)",
       None, "issue 11"),
    _e("image-sent-as-text",
       (r"Token indices sequence length is longer than the specified maximum sequence length",),
       "a very long text, often an image sent as base64 inside a text part instead of an image_url part",
       'send images as {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}} parts',
       None, "lmdeploy#3377"),
    _e("broken-symlink",
       (r"Too many levels of symbolic links", r"ELOOP"),
       "a symlink loop or a dangling link (often a Hugging Face cache copied without its blobs)",
       "copy with links resolved (cp -rL) or point the link at the real folder", "VB115", "common"),
    _e("permission-denied",
       (r"Permission denied", r"PermissionError"),
       "the process cannot read the model files (owner/mode, or a container user without access)",
       "make them readable: chmod -R a+rX MODEL_DIR, or run as the files' owner", "VB602", "common"),
    _e("no-cuda",
       (r"Torch not compiled with CUDA enabled", r"Found no NVIDIA driver", r"no CUDA GPUs are available"),
       "CUDA was requested but this torch or machine has no usable GPU",
       "install a CUDA build of torch / expose the GPU to the container (--gpus all), or use --device cpu",
       "VB506", "common"),
    _e("path-missing",
       (r"Can't load (the )?(config|configuration|tokenizer|processor) for", r"No such file or directory",
        r"does not appear to have a file named config\.json", r"is not a local folder and is not a valid model",
        r"Incorrect path_or_model_id", r"Repo id must be in the form 'repo_name' or 'namespace/repo_name'"),
       "the path is wrong (often a host path used inside a container) or the files are missing",
       "check the folder; inside a container mount it (volumes: [\"/host/dir:/models/NAME:ro\"]) and use the "
       "container path", "VB601", "field report", ("VB600", "VB100")),
    _e("json-invalid",
       (r"JSONDecodeError", r"Expecting (value|property name)"),
       "a JSON file of the model folder (index, tokenizer, processor or config) is corrupt or truncated",
       "run vlmbridge doctor MODEL_DIR to find which file, then re-download it", "VB106", "common",
       ("VB121", "VB134", "VB101")),
)  # fmt: skip


def _clean(text: str) -> str:
    return _ANSI.sub("", text)


def explain(text: str) -> list[Match]:
    """Every catalogue entry the text matches, most specific first, with the fragment that matched."""
    cleaned = _clean(text)
    out = []
    for entry in CATALOGUE:
        found = entry.search(cleaned)
        if found:
            line = cleaned[cleaned.rfind("\n", 0, found.start()) + 1 :].split("\n", 1)[0].strip()
            out.append(Match(entry=entry, matched=line[:300]))
    return out


def classify_all(text: str) -> list[Entry]:
    return [m.entry for m in explain(text)]


def classify(text: str) -> Entry | None:
    hits = classify_all(text)
    return hits[0] if hits else None
