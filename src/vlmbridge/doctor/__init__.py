"""`vlmbridge doctor`: diagnose a model folder before loading it, from its small files and safetensors headers.

from vlmbridge.doctor import diagnose, DoctorOptions
report = diagnose("/models/Qwen3-VL-8B-Instruct", DoctorOptions(gpu_memory=24 * 2**30))
report.exit_code, report.codes()
"""

from vlmbridge.doctor.codes import CODES, CodeInfo
from vlmbridge.doctor.context import DoctorOptions
from vlmbridge.doctor.findings import Area, Evidence, Finding, Report, Severity
from vlmbridge.doctor.runner import diagnose

__all__ = ["CODES", "Area", "CodeInfo", "DoctorOptions", "Evidence", "Finding", "Report", "Severity", "diagnose"]
