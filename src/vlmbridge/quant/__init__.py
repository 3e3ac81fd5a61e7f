"""Quantization: what a checkpoint's own quantization is and how it runs, the loader's quantization step, and
`vlmbridge quantize`.

- `formats`: facts shared by the loader, `vlmbridge plan` and the doctor (`detect`, `runtime`, the packages each
  `quant_method` needs). Imports neither torch nor transformers.
- `load`: from the folder and the load options to the extra `from_pretrained` arguments, or a refusal with the fix.
- `convert`: write a bitsandbytes-quantized copy of a checkpoint that loads without re-quantizing.
"""
