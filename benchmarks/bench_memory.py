"""Memory estimate vs measured on the CPU: the estimator `vlmbridge plan` and the doctor use, checked against the
growth of peak RSS over the post-import baseline while loading a checkpoint and answering one image question.

Checkpoints: the tiny builder's `small` Qwen3-VL (~30 M parameters) and a ~300 M-parameter Qwen3-VL built here
from the same machinery with wider, deeper dims (written to a temporary folder, never committed). Each
measurement runs in a fresh subprocess so RSS starts clean; loading options: fp32, bf16, and bnb-8bit / bnb-4bit
where bitsandbytes' CPU backend runs.

    python benchmarks/bench_memory.py                 # the table
    python benchmarks/bench_memory.py --keep DIR      # keep (and reuse) the built checkpoints in DIR
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

IMAGE_SIDE = 1024  # one 1024×1024 image → 1024 image tokens on Qwen3-VL
TEXT_REPEAT = 120  # ~1000 text tokens around it
NEW_TOKENS = 16
# ~300 M parameters: a real Qwen3-VL config, 20 layers of width 1024 and a 10-block vision tower of width 512.
MEDIUM_TEXT = {"hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 20, "num_attention_heads": 16,
               "num_key_value_heads": 8, "head_dim": 64}  # fmt: skip
MEDIUM_VISION = {"hidden_size": 512, "intermediate_size": 2048, "depth": 10, "num_heads": 8}


_FAMILY_MODULES = (
    "transformers.models.qwen3_vl.modeling_qwen3_vl",
    "transformers.models.qwen3_vl.processing_qwen3_vl",
    "transformers.models.qwen3_vl.video_processing_qwen3_vl",
    "transformers.models.qwen2_vl.image_processing_qwen2_vl",
)
_BNB_MODULES = ("bitsandbytes", "transformers.integrations.bitsandbytes", "transformers.quantizers.quantizer_bnb_4bit",
                "transformers.quantizers.quantizer_bnb_8bit")  # fmt: skip


def _status_kib(key: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/self/status")


def measure(model: str, option: str) -> dict[str, Any]:
    """In a fresh process: load `model` with `option`, answer one image question, report RSS (KiB)."""
    import torch  # noqa: F401  (imported before the baseline, as the server has it)
    import transformers  # noqa: F401

    from vlmbridge.engine.transformers.engine import TransformersEngine
    from vlmbridge.engine.types import ChatMessage, GenerationRequest, ImagePart, PixelBudget, SamplingParams, TextPart
    from vlmbridge.loader import LoadOptions, load_model
    from vlmbridge.media.decode import decode_image
    from vlmbridge.output.client import ModelClient
    from vlmbridge.output.pipeline import TextTools
    from vlmbridge.tiny.images import noise_picture

    # Library code is not model memory: import what loading will import (the family's modeling and processing
    # modules pull in torchvision and triton, ~190 MB of RSS) before taking the baseline.
    for module in _FAMILY_MODULES + (_BNB_MODULES if option.startswith("bnb") else ()):
        importlib.import_module(module)
    import io

    buf = io.BytesIO()
    noise_picture(IMAGE_SIDE, IMAGE_SIDE, 1).save(buf, format="PNG")
    image = decode_image(buf.getvalue())
    text = "Describe the picture and its colours in detail. " * TEXT_REPEAT
    baseline, baseline_file = _status_kib(), _status_kib("RssFile")
    started = time.perf_counter()
    quantization = option if option.startswith("bnb") else "none"
    dtype = "auto" if option.startswith("bnb") else option
    loaded = load_model(model, LoadOptions(device="cpu", dtype=dtype, quantization=quantization))
    after_load = _status_kib()
    engine = TransformersEngine(loaded, "bench")
    engine.start(warm_up=False)
    parts = (ImagePart(image, PixelBudget(max_pixels=IMAGE_SIDE * IMAGE_SIDE)), TextPart(text))
    request = GenerationRequest(
        messages=(ChatMessage("user", parts),),
        sampling=SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0),
    )
    chunks = list(ModelClient(engine, TextTools(loaded.tokenizer)).generate(request))
    engine.shutdown()
    errors = [str(c.error) for c in chunks if c.error is not None]
    if errors:
        raise RuntimeError(errors[0])
    usage = chunks[-1].usage
    assert usage is not None
    return {
        "baseline_kib": baseline,
        "after_load_kib": after_load,
        "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "file_kib": _status_kib("RssFile") - baseline_file,  # mapped checkpoint pages resident at the end
        "prompt_tokens": usage.prompt_tokens,
        "image_tokens": usage.image_tokens,
        "completion_tokens": usage.completion_tokens,
        "seconds": time.perf_counter() - started,
    }


def build_medium(out: Path) -> Path:
    """A ~300 M-parameter Qwen3-VL: the `small` tiny checkpoint's files with a wider, deeper config and weights."""
    import torch
    import transformers

    from vlmbridge.tiny.builder import build_tiny_model

    build_tiny_model(out, "qwen3_vl", size="small", layout="transformers")
    config = json.loads((out / "config.json").read_text())
    config["text_config"].update(MEDIUM_TEXT)
    half = MEDIUM_TEXT["head_dim"] // 2
    config["text_config"]["rope_parameters"]["mrope_section"] = [half * 3 // 8, 10, half - half * 3 // 8 - 10]
    vision = config["vision_config"]
    vision.update(MEDIUM_VISION, out_hidden_size=MEDIUM_TEXT["hidden_size"], deepstack_visual_indexes=[2, 5, 8])
    cfg = transformers.AutoConfig.for_model(**config)
    torch.manual_seed(0)
    model = transformers.AutoModelForImageTextToText.from_config(cfg, dtype=torch.bfloat16)
    for f in out.glob("*.safetensors"):
        f.unlink()
    model.save_pretrained(out)
    return out


def _estimate(model: Path, option: str, run: dict[str, Any]) -> int:
    from vlmbridge.memory import Workload, estimate
    from vlmbridge.plan import read_checkpoint

    ck = read_checkpoint(model)
    context = run["prompt_tokens"] + run["completion_tokens"]
    workload = Workload(context=context, images=1, image_size=(IMAGE_SIDE, IMAGE_SIDE), max_pixels=IMAGE_SIDE**2)
    return estimate(ck.stats, ck.geometry, workload, option, device_kind="cpu").total  # type: ignore[arg-type]


def _run_child(model: Path, option: str, *, return_freed: bool) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--measure", str(model), "--option", option]
    # glibc raises its mmap threshold after big frees and then keeps freed buffers in its heap: RSS holds on to
    # memory that is no longer live. A fixed threshold hands big buffers back to the OS, so RSS tracks live memory.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(256 * 1024)} if return_freed else None
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{model.name} {option}: {result.stderr.strip().splitlines()[-1]}")
    return json.loads(result.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _bnb_on_cpu() -> bool:
    try:
        import bitsandbytes
    except Exception:
        return False
    return "cpu" in getattr(bitsandbytes, "supported_torch_devices", set())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--option", help=argparse.SUPPRESS)
    parser.add_argument("--keep", type=Path, help="build the checkpoints here and reuse them next time")
    parser.add_argument("--models", default="small,medium", help="comma-separated: small, medium")
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.option)))
        return

    from vlmbridge.memory import format_bytes
    from vlmbridge.plan import read_checkpoint
    from vlmbridge.tiny.builder import build_tiny_model

    options = ["fp32", "bf16"] + (["bnb-8bit", "bnb-4bit"] if _bnb_on_cpu() else [])
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        builders = {"small": lambda p: build_tiny_model(p, "qwen3_vl", size="small"), "medium": build_medium}
        print(
            f"{'checkpoint':<22} {'params':>7} {'option':<9} {'tokens':>18} {'estimate':>10} "
            f"{'peak RSS':>10} {'error':>7} {'freed→OS':>10} {'error':>7} {'mapped':>9}"
        )
        worst: dict[str, float] = {}
        for name in args.models.split(","):
            folder = root / f"qwen3_vl-{name}"
            if not (folder / "config.json").exists():
                builders[name](folder)
            params = read_checkpoint(folder).stats.params
            for option in options:
                runs = [_run_child(folder, option, return_freed=flag) for flag in (False, True)]
                est = _estimate(folder, option, runs[0])
                measured = [(r["peak_kib"] - r["baseline_kib"]) * 1024 for r in runs]
                errors = [(est - m) / m * 100 for m in measured]
                kind = "bitsandbytes" if option.startswith("bnb") else "fp32/bf16"
                worst[kind] = max(worst.get(kind, 0.0), abs(errors[0]))
                cells = [
                    f"{format_bytes(m, binary=True):>10} {e:>+6.1f}%" for m, e in zip(measured, errors, strict=True)
                ]
                run = runs[0]
                tokens = f"{run['prompt_tokens']}+{run['completion_tokens']} ({run['image_tokens']} img)"
                mapped = format_bytes(run["file_kib"] * 1024, binary=True)
                print(
                    f"{folder.name:<22} {params / 1e6:>6.0f}M {option:<9} {tokens:>18} "
                    f"{format_bytes(est, binary=True):>10} {cells[0]} {cells[1]} {mapped:>9}",
                    flush=True,
                )
        for kind, error in worst.items():
            print(f"worst |error| against peak RSS, {kind}: {error:.1f}% (goal: within 15%)")


if __name__ == "__main__":
    main()
