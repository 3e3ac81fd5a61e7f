"""`vlmbridge explain`: the catalogue's messages (every row of errors.md), real tracebacks, and unknown text."""

from __future__ import annotations

import io
import json
import os

import pytest

from tests.conftest import TinyFactory
from tests.doctor_cases import explained_by, failure, load_vlm
from vlmbridge.catalogue import CATALOGUE, classify, classify_all, explain
from vlmbridge.cli.app import main

# (message as users report it, the doctor check the explanation must point to). The first block is the field
# report's table, the second the public issue trackers' rows of shared/reference/errors.md, verbatim fragments.
ERRORS_MD: list[tuple[str, str | None]] = [
    ("OSError: Can't load config for '/home/me/Qwen2-VL-7B'. If you were trying to load it from", "VB601"),
    ("FileNotFoundError: [Errno 2] No such file or directory: '/data/models/Qwen2-VL-7B/config.json'", "VB601"),
    ("KeyError: 'qwen' not found in Tokenizer", "VB201"),
    ("ValueError: Tokenizer class QWenTokenizer does not exist or is not currently imported.", "VB201"),
    ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", "VB504"),
    ("AttributeError: 'QwenModel' object has no attribute 'visual'", "VB204"),
    ("Unsupported modal input: image", "VB204"),
    ("KeyError: 'qwen2_vl'", "VB201"),
    ("KeyError: 'qwen2_5_vl'", "VB201"),
    ("ValueError: The checkpoint you are trying to load has model type `qwen2_5_vl` but Transformers does not "
     "recognize this architecture.", "VB201"),
    ("KeyError: 'qwen3_vl'", "VB201"),
    ("model type `qwen3_vl` but Transformers does not recognize this architecture", "VB201"),
    ("ValueError: Unrecognized configuration class <class 'transformers.models.qwen2_5_vl.configuration_qwen2_5_vl."
     "Qwen2_5_VLConfig'> for this kind of AutoModel: AutoModelForCausalLM.", "VB204"),
    ("ValueError: Unrecognized image processor in /models/Qwen2.5-VL-7B-Instruct. Should have a "
     "`image_processor_type` key in its preprocessor_config.json of config.json", "VB131"),
    ("ValueError: size must contain 'shortest_edge' and 'longest_edge' keys.", "VB132"),
    ("ValueError: Image features and image tokens do not match: tokens: 1024, features 2040", "VB205"),
    ("ValueError: The decoder prompt (length 17000) is longer than the maximum model length of 16384.", "VB507"),
    ("ValueError: The number of input tokens exceeds the pre-allocated encoder cache size (16384).", "VB507"),
    ("ValueError: To serve at least one request with the model's max seq len (262144), (36.00 GiB KV cache is "
     "needed, which is larger than the available KV cache memory (20.15 GiB).", "VB505"),
    ("ValueError: The input size is not aligned with the quantized weight shape.", "VB407"),
    ("RuntimeError: size_k = 4736 is not divisible by min_thread_k = 128", "VB407"),
    ("ValueError: Model architectures ['Qwen2_5_VLForConditionalGeneration'] are not supported for now.", "VB202"),
    ("Unrecognized keys in `rope_scaling` for 'rope_type'='default': {'mrope_section'}", "VB208"),
    ("ImportError: FlashAttention2 has been toggled on, but it cannot be used due to the following error", "VB403"),
    ("ImportError: /usr/lib/python3/site-packages/flash_attn_2_cuda.cpython-311-x86_64-linux-gnu.so: undefined "
     "symbol: _ZN3c104cuda9SetDeviceEi", "VB403"),
    ("ValueError: Loading /models/Qwen-VL-Chat requires you to execute the configuration file in that repo on your "
     "local machine. Make sure you have read the code there to avoid malicious use, then set the option "
     "`trust_remote_code=True` to remove this error.", "VB301"),
    ("Error: this model is missing data required for image input", "VB116"),
    ("image input is not supported - hint: if this is unexpected, you may need to provide the mmproj", "VB116"),
    ("safetensors_rust.SafetensorError: Error while deserializing header: MetadataIncompleteBuffer", "VB105"),
    ("Error while deserializing header: incomplete metadata, file not fully covered", "VB105"),
    ("_pickle.UnpicklingError: Weights only load failed. This file can still be loaded, to do so you have two "
     "options", "VB113"),
    ("FP8 quantized models is only supported on GPUs with compute capability >= 8.9 (e.g 4090/H100), actual = "
     "`8.0`. We will default to dequantizing the model to bf16.", "VB402"),
    ("Token indices sequence length is longer than the specified maximum sequence length for this model "
     "(145320 > 131072). Running this sequence through the model will result in indexing errors", None),
]  # fmt: skip

# Messages of the entries added beyond errors.md, as transformers 5.24 and friends print them.
ADDED: list[tuple[str, str | None]] = [
    ("RuntimeError: You set `ignore_mismatched_sizes` to `False`, thus raising an error. For details look at the "
     "above part of this error message.", "VB118"),
    ("openai.BadRequestError: Error code: 400 - image URL is a relative link (/files/…), which this server cannot "
     "resolve: Dify sends these when its FILES_URL is empty.", None),
    ("ValueError: Unrecognized model in /models/x. Should have a `model_type` key in its config.json.", "VB200"),
    ("OSError: It looks like the config file at '/m/config.json' is not a valid JSON file.", "VB101"),
    ("SafetensorError: Error while deserializing header: invalid UTF-8 in header", "VB104"),
    ("FileNotFoundError: No such file or directory: /m/model-00003-of-00004.safetensors", "VB103"),
    ("OSError: Error no file named model.safetensors, or pytorch_model.bin, found in directory /m.", "VB102"),
    ("OSError: Can't load image processor for '/m'. If you were trying to load it", "VB130"),
    ("AssertionError: Padding_idx must be within num_embeddings", "VB206"),
    ("/m: 120 tensors missing and 0 of the wrong shape for Qwen3VLForConditionalGeneration (e.g. model.visual.x)",
     "VB207"),
    ("RuntimeError: split_with_sizes expects split_sizes to sum exactly to 64", "VB208"),
    ("ValueError: Cannot use apply_chat_template because this processor does not have a chat template.", "VB123"),
    ("ImportError: Qwen2VLVideoProcessor requires the Torchvision library but it was not found", "VB404"),
    ("ValueError: Using a `device_map` ... requires `accelerate`. You can install it", "VB405"),
    ("ImportError: Loading a GPTQ quantized model requires optimum (`pip install optimum`)", "VB400"),
    ("ModuleNotFoundError: No module named 'tiktoken'", "VB409"),
    ("OSError: [Errno 40] Too many levels of symbolic links: '/m/model.safetensors'", "VB115"),
    ("PermissionError: [Errno 13] Permission denied: '/models/x/config.json'", "VB602"),
    ("AssertionError: Torch not compiled with CUDA enabled", "VB506"),
    ("json.decoder.JSONDecodeError: Expecting value: line 1 column 1 (char 0)", "VB106"),
    ("OSError: Repo id must be in the form 'repo_name' or 'namespace/repo_name': '/home/me/m'.", "VB601"),
]  # fmt: skip


@pytest.mark.parametrize(("message", "check"), ERRORS_MD + ADDED, ids=[m[:48] for m, _ in ERRORS_MD + ADDED])
def test_catalogue_messages(message: str, check: str | None) -> None:
    entry = classify(message)
    assert entry is not None, message
    assert entry.doctor_check == check, (entry.code, entry.doctor_check)


def test_every_catalogue_entry_is_exercised() -> None:
    hit = {entry.code for message, _ in ERRORS_MD + ADDED for entry in classify_all(message)}
    assert hit == {e.code for e in CATALOGUE}


def test_the_loaders_cause_codes_are_kept() -> None:
    # loader._classified reports entry.code as ModelLoadError.cause; these names are part of its contract.
    codes = {e.code for e in CATALOGUE}
    assert {"vlm-loaded-as-causal-lm", "transformers-too-old", "safetensors-truncated"} <= codes


@pytest.mark.parametrize(
    "text",
    [
        "hello world",
        "ValueError: invalid literal for int() with base 10: 'abc'",
        'Traceback (most recent call last):\n  File "app.py", line 3, in <module>\n    x = 1 / 0\n'
        "ZeroDivisionError: division by zero\n",
        "KeyError: 'llama'",
    ],
)
def test_unknown_text_says_unknown(text: str) -> None:
    assert explain(text) == []


def test_ansi_colours_are_ignored() -> None:
    assert classify("\x1b[1m_pickle.UnpicklingError\x1b[0m: \x1b[31mWeights only load failed\x1b[0m") is not None


def test_old_transformers_keyerror_from_its_real_config_mapping() -> None:
    # transformers < 4.57 looked the model_type up in a config mapping that lacked qwen3_vl: the real lookup
    # code on a mapping without the Qwen3-VL entries raises exactly that KeyError.
    from transformers.models.auto.auto_mappings import CONFIG_MAPPING_NAMES
    from transformers.models.auto.configuration_auto import _LazyConfigMapping

    older = _LazyConfigMapping({k: v for k, v in CONFIG_MAPPING_NAMES.items() if not k.startswith("qwen3_vl")})
    explained_by(failure(lambda: older["qwen3_vl"]), "VB201")


def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        code = main(args)
    except SystemExit as exc:
        code = exc.code
    return int(code or 0), capsys.readouterr().out


def test_cli_reads_a_real_traceback_from_stdin(
    tiny_copy: TinyFactory, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tiny_copy("qwen3_vl", "official", 3)
    shard = folder / "model-00002-of-00003.safetensors"
    os.truncate(shard, shard.stat().st_size // 2)
    traceback_text = failure(lambda: load_vlm(folder))
    monkeypatch.setattr("sys.stdin", io.StringIO(traceback_text))
    code, out = _cli(["explain", "-", "--json"], capsys)
    data = json.loads(out)
    assert code == 0 and data["known"] is True
    assert data["matches"][0]["code"] == "safetensors-truncated" and data["matches"][0]["doctor_check"] == "VB105"
    assert data["schema"] == "vlmbridge.explain/1"


def test_cli_rich_output_names_cause_fix_and_check(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _cli(["explain", "KeyError: 'qwen3_vl'"], capsys)
    assert code == 0
    assert "transformers-too-old" in out and "fix:" in out and "VB201" in out and "4.57" in out


def test_cli_unknown_exit_code_and_hint(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _cli(["explain", "something went sideways"], capsys)
    assert code == 1 and "unknown error" in out and "vlmbridge doctor MODEL_DIR" in out
    code, out = _cli(["explain", "--json", "something went sideways"], capsys)
    assert code == 1 and json.loads(out)["known"] is False


def test_cli_empty_input_is_a_usage_error(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("   \n"))
    code, _ = _cli(["explain", "-"], capsys)
    assert code == 2
