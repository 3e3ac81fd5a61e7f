"""All configuration, in two pydantic models and their flat union.

- `ModelSettings`: everything about loading and running one model (a models file's entries will be exactly these
  fields).
- `ServerSettings`: the HTTP server around it (binding, auth, image fetching and limits, timeouts, streaming).
- `Settings`: both together, read from `VLMBRIDGE_<FIELD>` environment variables (pydantic-settings).

Each field is the one source of its default, description and bounds: CLI flags are generated from the fields
(`vlmbridge.cli.options`), and commands pass only the flags the user gave as init arguments, so flags override the
environment, which overrides the defaults. A field whose flag is not `--field-name` names it in
`json_schema_extra={"flag": ...}` (`--a/--b` for an on/off pair).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from vlmbridge.budget import parse_size
from vlmbridge.quant.formats import QuantizationName

__all__ = ["DTypeName", "ModelSettings", "QuantizationName", "ServerSettings", "Settings", "parse_remote_code_pin"]

DTypeName = Literal["auto", "bf16", "fp16", "fp32"]


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vlmbridge"


def parse_remote_code_pin(spec: str) -> tuple[str, dict[str, str]]:
    """Parse `DIR=FILE:SHA256[,FILE:SHA256...]` (the CLI form of one allowlist entry)."""
    folder, sep, pins = spec.rpartition("=")
    if not sep or not folder or not pins:
        raise ValueError(f"expected DIR=FILE:SHA256[,FILE:SHA256...], got {spec!r}")
    parsed: dict[str, str] = {}
    for item in pins.split(","):
        name, colon, digest = item.strip().partition(":")
        digest = digest.strip().lower()
        if not colon or not name or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(f"pin {item!r} is not FILE:SHA256 (64 hex digits)")
        parsed[name.strip()] = digest
    return folder, parsed


class ModelSettings(BaseModel):
    """How to load and run one model."""

    model_config = ConfigDict(extra="forbid", validate_default=True)

    # --- loading -----------------------------------------------------------------------------------------
    model: Path | None = Field(
        None,
        description="Model folder (the one holding config.json).",
        json_schema_extra={"argument": "MODEL_DIR"},
    )
    served_model_name: str | None = Field(
        None, max_length=256, description="Model name clients use; default: the model folder's name."
    )
    dtype: DTypeName = Field(
        "auto",
        description="Weights dtype; auto = the checkpoint's stored dtype where the device supports it.",
    )
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N.", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa", description="Attention kernel transformers uses."
    )
    allow_pickle_weights: bool = Field(
        False,
        description="Allow loading pickle .bin weights (unsafe: pickle can run code). Off by default.",
        json_schema_extra={"flag": "--allow-pickle-weights/--refuse-pickle-weights"},
    )
    quantization: QuantizationName = Field(
        "auto",
        description="auto: quantize with bitsandbytes only if the model does not fit the device unquantized (the "
        "`vlmbridge plan` choice, logged); none; bnb-8bit (int8); bnb-4bit (nf4). Pre-quantized checkpoints "
        "always load as stored.",
    )
    allow_dequantize: bool = Field(
        False,
        description="Load a pre-quantized checkpoint the device has no kernels for (FP8 below compute capability "
        "8.9, compressed-tensors int formats) dequantized, at 2-4x its memory. Off: that is an error.",
        json_schema_extra={"flag": "--allow-dequantize/--refuse-dequantize"},
    )
    trust_remote_code: Annotated[dict[str, dict[str, str]], NoDecode] = Field(
        default_factory=dict,
        description="Remote-code allowlist: folder → {file.py: sha256}. JSON in the environment; "
        "DIR=FILE:SHA256[,FILE:SHA256] on the command line (repeatable).",
    )
    skip_doctor: bool = Field(
        False,
        description="Start even if `vlmbridge doctor` finds errors in the folder.",
        json_schema_extra={"flag": "--skip-doctor"},
    )

    # --- generation ----------------------------------------------------------------------------------------
    context_length: int | None = Field(
        None,
        ge=16,
        le=1 << 21,
        description="Context window in tokens; default min(model maximum, 32768).",
        json_schema_extra={"flag": "--context"},
    )
    max_new_tokens: int = Field(
        512, ge=1, le=131072, description="Default completion length when a request does not set one."
    )
    max_pixels: int = Field(
        1024 * 1024,
        ge=3136,
        le=16384 * 32 * 32,
        description="Largest pixel budget per image (H×W after resizing); caps image tokens and memory.",
    )
    min_pixels: int | None = Field(
        None, ge=1024, le=16384 * 32 * 32, description="Smallest pixel budget per image; default: the processor's own."
    )
    low_detail_pixels: int = Field(
        512 * 512, ge=3136, le=16384 * 32 * 32, description="Pixel budget for images sent with OpenAI detail=low."
    )
    # Model settings (the front admits at most this many; the vLLM engine reserves memory for that many at start-up).
    max_images: int = Field(8, ge=0, le=256, description="Most images in one request (all messages together).")
    max_videos: int = Field(2, ge=0, le=32, description="Most videos in one request (all messages together).")

    # --- engine --------------------------------------------------------------------------------------------
    max_batch_size: int = Field(8, ge=1, le=256, description="Requests decoded together (continuous batching).")
    max_queue: int = Field(64, ge=1, le=100000, description="Requests waiting for the engine; more get 429.")
    max_prefill_tokens: int = Field(
        8192, ge=16, le=1 << 20, description="Prompt tokens prefilled in one pass; bounds prefill memory."
    )
    batch_wait_ms: float = Field(
        0.0,
        ge=0,
        le=1000,
        description="When idle, wait this long for more requests to prefill them together (0: start at once; "
        "requests that arrive later join the running batch at its next step).",
    )
    prefix_cache_mb: int = Field(
        1024, ge=0, le=1 << 20, description="MiB of finished requests' KV cache kept for follow-up turns (0 = off)."
    )
    encoder_cache_mb: int = Field(
        256, ge=0, le=1 << 20, description="MiB of vision-encoder outputs kept per picture and pixel budget (0 = off)."
    )
    pixel_cache_mb: int = Field(
        256,
        ge=0,
        le=1 << 20,
        description="MiB of processed pixels kept per picture and pixel budget, so a follow-up turn skips decoding "
        "and the image processor (0 = off).",
    )
    torch_threads: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="CPU threads for the engine's torch kernels when serving on CPU (prefill and decode); "
        "default: all cores.",
    )
    engine_worker: Literal["process", "thread"] = Field(
        "process",
        description="process: the model's engine runs in its own worker process (a crash fails only its requests "
        "and it restarts; unloading frees all its memory); thread: in the server's process (debugging, tests).",
    )
    grammar_compile_timeout: float = Field(
        10.0,
        gt=0,
        le=600,
        description="Seconds a response_format schema or tool grammar may take to compile (off the engine thread); "
        "a slower one is a 400.",
    )
    engine_stall_timeout: float = Field(
        120.0,
        ge=0,
        le=86400,
        description="Seconds one engine step may take before /health reports the engine stuck (0 = never); "
        "a long prefill on a CPU can take many seconds.",
    )

    # --- vLLM backend (engine: vllm) -------------------------------------------------------------------------
    engine: Literal["transformers", "vllm"] = Field(
        "transformers",
        description="transformers: the embedded engine (CPU, laptops, CI); vllm: the model's worker runs vLLM's "
        "AsyncLLM (GPU speed, tensor/pipeline parallelism, Ray) behind the same API (docs/scale.md).",
    )
    vllm_python: Path | None = Field(
        None,
        description="Python interpreter of a venv with vLLM, for engine: vllm workers (vLLM keeps the torch build it "
        "needs); default: VLMBRIDGE_VLLM_PYTHON, else this interpreter.",
    )
    tensor_parallel_size: int = Field(
        1, ge=1, le=256, description="engine: vllm — GPUs each layer is split across (tensor parallelism)."
    )
    pipeline_parallel_size: int = Field(
        1, ge=1, le=64, description="engine: vllm — pipeline stages the layers are split into (GPUs or nodes)."
    )
    distributed_executor_backend: Literal["mp", "ray"] | None = Field(
        None,
        description="engine: vllm — how vLLM runs its GPU workers: mp (one node) or ray (several nodes); default: "
        "vLLM's choice.",
    )
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="engine: vllm — share of each GPU's memory vLLM may use (weights, KV, graphs)."
    )
    vllm_cpu_kv_cache_gib: float = Field(
        4.0,
        gt=0,
        le=4096,
        description="engine: vllm on a CPU — GiB of KV cache (VLLM_CPU_KVCACHE_SPACE; vLLM's own default takes "
        "a share of all RAM).",
    )

    @field_validator("trust_remote_code", mode="before")
    @classmethod
    def _parse_pins(cls, value: object) -> object:
        # Environment gives a JSON string; the CLI gives a list of DIR=FILE:SHA specs.
        if isinstance(value, str):
            return json.loads(value) if value.strip() else {}
        if isinstance(value, list | tuple):
            entries: dict[str, dict[str, str]] = {}
            for spec in value:
                folder, pins = parse_remote_code_pin(str(spec))
                entries.setdefault(folder, {}).update(pins)
            return entries
        return value

    def served_name(self, path: Path) -> str:
        """The name clients use for the model in `path`."""
        return self.served_model_name or path.resolve().name


class ServerSettings(BaseModel):
    """The HTTP server around the model: binding, auth, image fetching and limits, timeouts, streaming."""

    model_config = ConfigDict(extra="forbid", validate_default=True)

    host: str = Field("127.0.0.1", description="Address to bind; 0.0.0.0 exposes the server (set an API key).")
    port: int = Field(8000, ge=0, le=65535, description="Port to listen on (0 = any free port).")
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="Accepted API keys (Authorization: Bearer KEY). Empty = no auth. "
        "Environment: comma-separated or a JSON list.",
        json_schema_extra={"flag": "--api-key"},
    )
    public_metrics: bool = Field(
        False,
        description="Serve /metrics without the API key (for a scraper on a private network).",
        json_schema_extra={"flag": "--public-metrics"},
    )
    max_body_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, le=1 << 31, description="Largest request body; larger ones get 413."
    )
    request_timeout: float = Field(
        600.0, gt=0, le=86400, description="Seconds a request may take from arrival to its last token."
    )
    keepalive_interval: float = Field(
        10.0, gt=0, le=300, description="Seconds between SSE keep-alive comments while a stream waits."
    )
    stream_usage: Literal["always", "requested"] = Field(
        "always",
        description="always: a stream whose client did not ask for usage carries it on the chunk with "
        "finish_reason (Dify's SDK reads it there instead of counting tokens itself); requested: only with "
        "stream_options.include_usage, as OpenAI does.",
    )
    models_file: Path | None = Field(
        None,
        description="A models file (YAML): several models behind one server, loaded on demand; see docs/models.md.",
        json_schema_extra={"flag": "--models"},
    )
    memory_budget: int | None = Field(
        None,
        ge=1 << 20,
        le=1 << 50,
        description="Memory all loaded models may use together (2GiB, 512MiB or bytes); least recently used idle "
        "models are unloaded to make room. Default: what the device has.",
        json_schema_extra={"size": True},
    )
    admin_key: SecretStr | None = Field(
        None,
        description="Key for the /admin routes (Authorization: Bearer KEY); a client API key does not open them. "
        "Without it the admin routes are off.",
    )
    shutdown_grace: float = Field(
        30.0,
        ge=0,
        le=3600,
        description="Seconds in-flight requests may take to finish after SIGTERM/SIGINT; streams still running "
        "then end with an error event. Give the container a longer stop grace.",
    )

    # --- images --------------------------------------------------------------------------------------------
    max_image_bytes: int = Field(
        20 * 1024 * 1024, ge=1024, le=1 << 30, description="Largest image file (downloaded or base64-decoded)."
    )
    allow_image_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Hosts, IPs or CIDRs image URLs may point to even if private or loopback "
        "(e.g. Dify's file server). Comma-separated or JSON in the environment.",
        json_schema_extra={"flag": "--allow-image-host"},
    )
    allow_local_dirs: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="Directories whose files image_url may reference. Off by default.",
        json_schema_extra={"flag": "--allow-local-dir"},
    )
    image_fetch_timeout: float = Field(15.0, gt=0, le=600, description="Seconds allowed for downloading one image URL.")
    image_max_redirects: int = Field(3, ge=0, le=10, description="Redirects followed when fetching an image URL.")
    max_pixels_in_flight: int | None = Field(
        None,
        ge=4096 * 4096,
        le=1 << 34,
        description="Decoded image pixels all requests may hold at once (reserved from the image headers before "
        "decoding); a request that would pass it gets 429 with Retry-After. Default: 8 × the per-image decode "
        "limit (16 × max_pixels, between 4096² and 8192²).",
    )

    # --- videos --------------------------------------------------------------------------------------------
    # A video travels base64 in the JSON body, a third larger than the file: max_video_bytes must stay below
    # about 3/4 of max_body_bytes (the defaults: 48 MiB of video in a 64 MiB body). Raise both together.
    max_video_bytes: int = Field(
        48 * 1024 * 1024,
        ge=1024,
        le=1 << 32,
        description="Largest video file (downloaded, read or base64-decoded). Base64 adds a third: keep it under "
        "3/4 of --max-body-bytes, and raise that too for larger uploads (a 100 MB clip needs a 134 MB body).",
    )
    video_fps: float = Field(
        2.0, gt=0, le=30, description="Frames sampled per second of video when a request does not set fps."
    )
    video_max_frames: int = Field(
        32, ge=1, le=4096, description="Frames sampled per video when a request does not set max_frames."
    )
    max_video_frames: int = Field(
        128,
        ge=1,
        le=4096,
        description="Most frames per video a request may ask for (max_frames) or send as a frame list.",
    )
    video_max_pixels: int = Field(
        640 * 360,
        ge=3136,
        le=16384 * 32 * 32,
        description="Largest pixel budget per video frame (H×W after resizing); caps a request's max_pixels.",
    )
    max_video_seconds: float = Field(
        600.0, gt=0, le=86400, description="Longest video accepted, from its header (checked before decoding)."
    )
    max_video_frame_pixels: int = Field(
        3840 * 2160,
        ge=4096,
        le=1 << 28,
        description="Largest frame size a video's header may claim (W×H; default 4K UHD, so 8K is refused).",
    )
    video_decode_timeout: float = Field(
        60.0, gt=0, le=3600, description="Seconds one video's decode may take before the request gets a 400."
    )

    cache_dir: Path = Field(
        default_factory=_default_cache_dir,
        description="Where vlmbridge keeps what it builds (the demo and benchmark models, the demo picture); "
        "default: $XDG_CACHE_HOME/vlmbridge, else ~/.cache/vlmbridge.",
    )

    @field_validator("memory_budget", mode="before")
    @classmethod
    def _parse_size(cls, value: object) -> object:
        if isinstance(value, str):  # "" (an empty environment variable) = the default
            return parse_size(value) if value.strip() else None
        return value

    @field_validator("api_keys", "allow_image_hosts", "allow_local_dirs", mode="before")
    @classmethod
    def _parse_list(cls, value: object) -> object:
        # Environment variables arrive as one string: a JSON list or comma-separated values.
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [v.strip() for v in text.split(",") if v.strip()]
        return value


class Settings(ServerSettings, ModelSettings, BaseSettings):
    """vlmbridge settings. Environment variables: `VLMBRIDGE_<FIELD>` (lists and mappings as JSON)."""

    model_config = SettingsConfigDict(env_prefix="VLMBRIDGE_", extra="forbid", validate_default=True)

    def model_settings(self) -> ModelSettings:
        """The part that is about the model (what the engine factory takes)."""
        return ModelSettings.model_validate({name: getattr(self, name) for name in ModelSettings.model_fields})
