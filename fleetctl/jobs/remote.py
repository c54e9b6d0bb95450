"""The remote half of a job, as POSIX ``sh`` text built here (pure functions, no I/O).

A job attempt lives in a private directory ``${TMPDIR:-/tmp}/fleetctl-job-<id>-a<attempt>-<agent>.XXXXXXXX``
made by ``mktemp -d`` (mode 0700, unpredictable suffix). In it:

    job.json      what the job sees at $FLEETCTL_JOB_FILE (uploaded over SFTP)
    code/         a job with code (``submit --code``): its own tree, its working directory (fleetctl.jobs.code)
    run.sh        the wrapper (uploaded over SFTP); runs the command in its own session
    started/      made by the launch step with ``mkdir``: atomic, so a second launch is refused
    wrapper       the wrapper's PID (alive = the job is running)
    pgid          the command's process group (cancel and timeout signal it)
    stdout.log, stderr.log, output.json ($FLEETCTL_OUTPUT_FILE)
    cancelled, timed_out   markers written before the signals are sent
    result.json   exit code, signal and times; written to a temp name then renamed

Every value that reaches the shell goes through ``shlex.quote``. The directory's name and the scan
each heartbeat makes of such directories are host-level (``fleetctl/telemetry/jobdirs.py``).
"""

from __future__ import annotations

import shlex
from typing import Literal, get_args

from fleetctl.jobs.code.manifest import TREE_DIR as CODE_TREE  # a job with code runs in its own tree there
from fleetctl.jobs.model import JobSpec, task_environment
from fleetctl.settings import ControllerSettings, default_of
from fleetctl.telemetry.jobdirs import DIR_PATTERN, dir_prefix

KILL_GRACE_S: int = default_of(ControllerSettings, "kill_grace_s")


def make_dir_command(job_id: str, attempt: int, agent: str) -> str:
    template = dir_prefix(job_id, attempt, agent) + ".XXXXXXXX"
    script = 'umask 077; d=$(mktemp -d "${TMPDIR:-/tmp}/TEMPLATE") && printf %s "$d"'.replace("TEMPLATE", template)
    return "sh -c " + shlex.quote(script)


def _in_tree(spec: JobSpec) -> bool:
    """A job with code runs in its tree, ``$d/code``; a relative ``workdir`` is then inside the tree."""
    workdir = spec.workdir or ""
    return spec.code is not None and not (workdir.startswith("/") or workdir == "~" or workdir.startswith("~/"))


def working_dir(spec: JobSpec, remote_dir: str) -> str:
    """Where the job's command runs, as a path relative outputs are read from (``~/`` left as is)."""
    if _in_tree(spec):
        return f"{remote_dir}/{CODE_TREE}" + (f"/{spec.workdir}" if spec.workdir else "")
    return spec.workdir or remote_dir


def _cd(spec: JobSpec) -> str:
    workdir = spec.workdir
    if _in_tree(spec):
        return f'cd "$d"/{CODE_TREE}/{shlex.quote(workdir or ".")}'
    if not workdir:
        return 'cd "$d"'
    if workdir == "~" or workdir.startswith("~/"):
        return f'cd "$HOME"/{shlex.quote(workdir[2:] or ".")}'
    return f"cd {shlex.quote(workdir)}"


def gpu_environment(vendor: str, gpu_ids: list[str]) -> dict[str, str]:
    visible = ",".join(gpu_ids)
    if vendor == "amd":
        return {"HIP_VISIBLE_DEVICES": visible, "ROCR_VISIBLE_DEVICES": visible}
    return {"CUDA_VISIBLE_DEVICES": visible}


def wrapper_script(job_id: str, remote_dir: str, spec: JobSpec, gpu_env: dict[str, str],
                   kill_grace_s: int = KILL_GRACE_S, prepare: str = "") -> str:
    """``run.sh``: start the command in a session of its own, wait, write result.json atomically.
    ``prepare``: a command run first (a job with code: building its tree); if it fails, the command
    does not run and the job ends with exit code 126 and the reason in stderr.log."""
    env = {**spec.env, **(task_environment(spec.task) if spec.task else {}), **gpu_env}
    exports = "\n".join(f"export {name}={shlex.quote(value)}" for name, value in env.items())
    command = " ".join(shlex.quote(word) for word in spec.command)
    code_dir = f' FLEETCTL_CODE_DIR="$d/{CODE_TREE}"' if spec.code is not None else ""
    watchdog = ""
    if spec.timeout_s:
        # On the host, so the deadline holds while the controller is down or the network is gone.
        watchdog = (f"setsid sh -c 'sleep {int(spec.timeout_s + 0.999)}; [ -e \"$1/result.json\" ] || {{ : > \"$1/timed_out\"; "
                    f"kill -TERM -\"$2\"; sleep {kill_grace_s}; kill -KILL -\"$2\"; }}' sh \"$d\" \"$child\" "
                    "</dev/null >/dev/null 2>&1 &\nwatchdog=$!")
    return f"""#!/bin/sh
d={shlex.quote(remote_dir)}
echo $$ > "$d/wrapper"
export FLEETCTL_JOB_ID={shlex.quote(job_id)} FLEETCTL_JOB_FILE="$d/job.json" FLEETCTL_OUTPUT_FILE="$d/output.json"{code_dir}
{exports}
started=$(date +%s)
if {f"{{ {prepare} && {_cd(spec)}; }}" if prepare else _cd(spec)} 2>"$d/stderr.log"; then
  setsid {command} >"$d/stdout.log" 2>"$d/stderr.log" </dev/null &
  child=$!
  echo "$child" > "$d/pgid"
  {watchdog}
  wait "$child"; rc=$?
  [ -n "${{watchdog:-}}" ] && kill -KILL -"$watchdog" 2>/dev/null
else
  rc=126
fi
sig=null; [ "$rc" -gt 128 ] && [ "$rc" -lt 193 ] && sig=$((rc - 128))
t=false; [ -e "$d/timed_out" ] && t=true
c=false; [ -e "$d/cancelled" ] && c=true
printf '{{"exit_code": %s, "signal": %s, "started": %s, "finished": %s, "timed_out": %s, "cancelled": %s}}\\n' \\
  "$rc" "$sig" "$started" "$(date +%s)" "$t" "$c" > "$d/result.json.tmp" && mv "$d/result.json.tmp" "$d/result.json"
"""


def launch_command(remote_dir: str) -> str:
    """Start the wrapper detached. ``mkdir started`` is atomic: a second launch of the same
    directory (a controller that died between upload and launch, then retried) is refused."""
    script = (
        f"d={shlex.quote(remote_dir)}\n"
        '[ -f "$d/job.json" ] && [ -f "$d/run.sh" ] || { echo "job files missing in $d" >&2; exit 3; }\n'
        'command -v setsid >/dev/null 2>&1 || { echo "setsid not found on the host (install util-linux)" >&2; exit 5; }\n'
        'mkdir "$d/started" 2>/dev/null || { echo "already started" >&2; exit 4; }\n'
        'setsid sh "$d/run.sh" </dev/null >/dev/null 2>&1 &\n'
        "echo started"
    )
    return "sh -c " + shlex.quote(script)


LAUNCH_ALREADY_STARTED = 4


def cancel_command(remote_dir: str, force: bool, grace_s: int = KILL_GRACE_S) -> str:
    """SIGTERM to the job's process group, SIGKILL after ``grace_s`` (by a detached helper on the
    host, so it happens even if the controller goes away), or SIGKILL at once with ``force``."""
    then = ('kill -KILL -"$p" 2>/dev/null' if force else
            f"setsid sh -c 'sleep {grace_s}; kill -KILL -\"$1\" 2>/dev/null' sh \"$p\" </dev/null >/dev/null 2>&1 &")
    script = (f"d={shlex.quote(remote_dir)}\n"
              '[ -f "$d/pgid" ] || exit 3\n'
              'p=$(cat "$d/pgid"); : > "$d/cancelled"\n'
              'kill -TERM -"$p" 2>/dev/null\n'
              f"{then}\necho signalled")
    return "sh -c " + shlex.quote(script)


def remove_command(remote_dir: str) -> str:
    if not DIR_PATTERN.search(remote_dir):  # never rm -rf anything but a job directory
        raise ValueError(f"refusing to remove {remote_dir!r}: not a fleetctl job directory")
    return f"rm -rf -- {shlex.quote(remote_dir)}"


ProbeState = Literal["partial", "ready", "started"]


def probe_command(job_id: str, attempt: int, agent: str) -> str:
    """Where a dispatch of ``attempt`` got to, read from its directory (a restart or a takeover settles
    a ``dispatching`` job by it): one line ``STATE DIR``, STATE being ``partial`` (made, files missing),
    ``ready`` (job.json and run.sh there) or ``started`` (launched); nothing if no directory was made."""
    pattern = f'"${{TMPDIR:-/tmp}}"/{dir_prefix(job_id, attempt, agent)}.*'
    probe = (f"for d in {pattern}; do [ -d \"$d\" ] || continue; s=partial; "
             '[ -f "$d/job.json" ] && [ -f "$d/run.sh" ] && s=ready; [ -d "$d/started" ] && s=started; '
             'printf "%s %s\\n" "$s" "$d"; done')
    return "sh -c " + shlex.quote(probe)


def parse_probe(stdout: str) -> tuple[ProbeState, str] | None:
    """The first directory :func:`probe_command` found, as (state, path); None if there is none. Lines
    that are not the probe's (a login shell's rc file may print) are passed over, never taken for "none"."""
    for line in stdout.splitlines():
        found = line.split(maxsplit=1)
        if len(found) == 2 and found[0] in get_args(ProbeState) and found[1].startswith("/"):
            return found[0], found[1].strip()  # type: ignore[return-value]
    return None
