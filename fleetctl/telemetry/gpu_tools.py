"""The GPU query commands fleetctl runs, and how a host's tool is detected."""

from __future__ import annotations

NVIDIA_FIELDS = ("index,uuid,name,memory.total,memory.used,memory.free,utilization.gpu,"
                 "temperature.gpu,power.draw,power.limit")
DEFAULT_QUERIES = {
    "nvidia-smi": f"nvidia-smi --query-gpu={NVIDIA_FIELDS} --format=csv,noheader,nounits",
    "rocm-smi": "rocm-smi --showid --showuniqueid --showproductname --showuse --showmeminfo vram "
                "--showtemp --showpower --json",
    "amd-smi": "amd-smi metric --json",
}
TOOLS = tuple(DEFAULT_QUERIES)

# One exec tells which tools exist and which address the host was reached on ($SSH_CONNECTION).
DETECT_COMMAND = (
    'for t in ' + " ".join(TOOLS) + '; do command -v "$t" >/dev/null 2>&1 && echo "tool $t"; done; '
    'echo "conn $SSH_CONNECTION"'
)


def parse_detection(stdout: str) -> tuple[list[str], str | None]:
    """Tools found (in preference order) and the host's own address from ``$SSH_CONNECTION``."""
    tools: list[str] = []
    address: str | None = None
    for line in stdout.splitlines():
        kind, _, rest = line.partition(" ")
        if kind == "tool" and rest in TOOLS:
            tools.append(rest)
        elif kind == "conn":
            parts = rest.split()
            address = parts[2] if len(parts) == 4 else None
    return tools, address


def default_query(tools: list[str]) -> str | None:
    return DEFAULT_QUERIES[tools[0]] if tools else None
