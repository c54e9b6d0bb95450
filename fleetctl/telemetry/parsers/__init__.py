"""Pure parsers: GPU tool text in, typed samples out. No I/O anywhere in this package."""

from __future__ import annotations

import functools
import re
import shlex

from fleetctl.errors import DriverError, InvalidQueryError, NoGpusError, ParseError, ToolMissingError
from fleetctl.telemetry.parsers.nvidia import parse_nvidia_csv
from fleetctl.telemetry.parsers.rocm import parse_amd_smi, parse_rocm_csv, parse_rocm_json
from fleetctl.telemetry.snapshot import GpuSample

_DRIVER_FAILURES = (
    re.compile(r"couldn't communicate with the NVIDIA driver[^\n]*", re.I),
    re.compile(r"Driver/library version mismatch[^\n]*", re.I),
    re.compile(r"Failed to initialize NVML: (?!No supported GPUs)[^\n]*", re.I),
    re.compile(r"Unable to determine the device handle[^\n]*", re.I),
    re.compile(r"Driver not initialized[^\n]*", re.I),
    re.compile(r"amdgpu not found in modules[^\n]*", re.I),
    re.compile(r"GPU access blocked by the operating system[^\n]*", re.I),
)
_NO_GPUS = re.compile(r"No devices were found|No supported GPUs were found|No AMD GPUs specified", re.I)
_INVALID_FIELD = re.compile(r'Field "([^"]+)" is not a valid field to query', re.I)
_NOT_FOUND = re.compile(r"(command not found|not found|No such file or directory)\s*$", re.I | re.M)


@functools.lru_cache(maxsize=256)
def tool_of(command: str) -> str:
    """``nvidia-smi``, ``rocm-smi`` or ``amd-smi`` from a command line (path and sudo allowed)."""
    try:
        words = shlex.split(command)
    except ValueError:
        words = command.split()
    for word in words:
        base = word.rsplit("/", 1)[-1]
        if base in ("nvidia-smi", "rocm-smi", "amd-smi", "nvidia-smi.exe"):
            return base.removesuffix(".exe")
    return ""


MAX_GPUS = 1024  # no host has more; more rows are a broken or hostile tool, refused before any is parsed
MAX_MESSAGE = 200  # host text quoted in an error's one line; the whole text stays in ``raw``


def parse_gpu_output(command: str, stdout: str, *, exit_code: int = 0, stderr: str = "",
                     max_gpus: int = MAX_GPUS) -> list[GpuSample]:
    """Parse what ``command`` printed. Known failures raise typed errors, not parse noise:
    :class:`ToolMissingError`, :class:`DriverError`, :class:`NoGpusError`,
    :class:`InvalidQueryError`; anything else unreadable raises :class:`ParseError` with the raw text.
    """
    text = f"{stdout}\n{stderr}"
    tool = tool_of(command)
    if exit_code == 127 or (exit_code != 0 and _NOT_FOUND.search(stderr)):
        raise ToolMissingError(f"{tool or (command.split() or ['the GPU tool'])[0]} is not installed on the host", text,
                               hint="install the GPU driver tools, or set gpu_query_cmd")
    for pattern in _DRIVER_FAILURES:
        found = pattern.search(text)
        if found:
            raise DriverError(found.group(0).strip().rstrip(".")[:MAX_MESSAGE], text)
    if _NO_GPUS.search(text) and "{" not in stdout and "device," not in stdout:
        raise NoGpusError("the GPU tool found no GPUs", text)
    invalid = _INVALID_FIELD.search(text)
    if invalid:
        raise InvalidQueryError(f"nvidia-smi does not know the field {invalid.group(1)!r}", text,
                                hint="fix --query-gpu in gpu_query_cmd (see nvidia-smi --help-query-gpu)")
    try:
        samples = _parse(tool, command, stdout, max_gpus)
    except ParseError:
        if exit_code != 0:
            raise ParseError(_exited(tool, exit_code, text), text) from None
        raise
    except Exception as exc:  # noqa: BLE001 -- a host's bytes must never raise anything but ParseError
        # (RecursionError for deep JSON, MemoryError, whatever a parser overlooked)
        raise ParseError(f"unreadable {tool or 'GPU tool'} output: {type(exc).__name__}: {str(exc)[:MAX_MESSAGE]}",
                         stdout) from exc
    if len(samples) > max_gpus:  # each parser refuses earlier; this holds whatever a parser missed
        raise ParseError(f"{tool or 'the GPU tool'} reports more than {max_gpus} GPUs: not believable", stdout[:2000])
    if exit_code != 0 and not samples:
        raise ParseError(_exited(tool, exit_code, text), text)
    return samples


def _parse(tool: str, command: str, stdout: str, max_gpus: int) -> list[GpuSample]:
    if tool == "amd-smi":
        return parse_amd_smi(stdout, max_gpus)
    if tool == "rocm-smi":
        return parse_rocm_csv(stdout, max_gpus) if "--csv" in command else parse_rocm_json(stdout, max_gpus)
    if tool == "nvidia-smi" or "," in stdout or not stdout.strip():
        return parse_nvidia_csv(command, stdout, max_gpus)
    raise ParseError("cannot tell which GPU tool printed this", stdout)


def _exited(tool: str, exit_code: int, text: str) -> str:
    last = (text.strip().splitlines() or [""])[-1]
    return f"{tool or 'GPU tool'} exited {exit_code}: {last[:MAX_MESSAGE]}"


__all__ = ["InvalidQueryError", "NoGpusError", "parse_gpu_output", "tool_of"]
