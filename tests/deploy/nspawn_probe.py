"""Runs inside the booted systemd-nspawn container as a oneshot unit: watches edge-embed.service
through systemd, hangs it, stops it, writes what it saw to /results/probe.json and powers off.

Run by the installed venv's python, so it can use edge_embed.client against the server.
"""

from __future__ import annotations

import json
import os
import pwd
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

UNIT = "edge-embed.service"
RESULTS = Path("/results")
SERVER = "127.0.0.1:50051"
VENV_BIN = Path(sys.executable).parent


def _run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=False, **kwargs)


def show(*props: str, unit: str | None = UNIT) -> dict[str, str]:
    argv = ["systemctl", "show", *(["--property=" + p for p in props])]
    if unit:
        argv.append(unit)
    out = _run(argv, capture_output=True, text=True, timeout=30).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def wait_for(predicate, timeout: float, step: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    return None


def active_pid() -> int | None:
    state = show("ActiveState", "SubState", "MainPID")
    if state["ActiveState"] == "active" and state["SubState"] == "running" and state["MainPID"] != "0":
        return int(state["MainPID"])
    return None


def health() -> tuple[int, str]:
    done = _run([str(VENV_BIN / "edge-embed"), "health", "--server", SERVER],
                          capture_output=True, text=True, timeout=30)
    return done.returncode, (done.stdout + done.stderr).strip()


def process_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def probe() -> dict:
    report: dict = {}
    manager = show("UserspaceTimestampMonotonic", unit=None)
    started = wait_for(active_pid, 240)
    report["ready"] = started is not None
    unit = show("ActiveState", "Result", "StatusText", "NRestarts", "WatchdogUSec", "InactiveExitTimestampMonotonic",
                "ActiveEnterTimestampMonotonic", "User", "Type", "ExecStartPre")
    report["unit"] = unit
    if not started:
        return report
    # Seconds from systemd's start (PID 1) and from the unit's start to READY=1.
    report["ready_after_boot_s"] = (int(unit["ActiveEnterTimestampMonotonic"])
                                    - int(manager["UserspaceTimestampMonotonic"])) / 1e6
    report["ready_after_start_s"] = (int(unit["ActiveEnterTimestampMonotonic"])
                                     - int(unit["InactiveExitTimestampMonotonic"])) / 1e6
    report["health"] = health()

    from edge_embed.client import EmbedClient

    with EmbedClient(SERVER, timeout=60) as client:
        report["dim"] = int(client.embed(["booted by systemd"]).shape[1])

    status = process_status(started)
    report["process"] = {k: status.get(k) for k in ("Uid", "NoNewPrivs", "Seccomp", "CapEff", "CapBnd")}
    report["process"]["service_uid"] = pwd.getpwnam("edge-embed").pw_uid

    # A hung server: it stops pinging the watchdog; systemd must kill and restart it.
    hung_at = time.monotonic()
    os.kill(started, signal.SIGSTOP)

    def restarted() -> int | None:
        pid = active_pid()
        return pid if pid and pid != started else None

    new_pid = wait_for(restarted, 120)
    report["watchdog"] = {
        "restarted": new_pid is not None,
        "seconds": round(time.monotonic() - hung_at, 1),
        "unit": show("NRestarts", "Result", "ActiveState"),
    }
    if new_pid:
        report["health_after_restart"] = wait_for(lambda: (h := health())[0] == 0 and h, 60) or health()

    stop = _run(["systemctl", "stop", UNIT], capture_output=True, text=True, timeout=120)
    report["stop"] = {"rc": stop.returncode, **show("ActiveState", "Result", "ExecMainCode", "ExecMainStatus")}

    # Without a bundle the unit must refuse to start, saying why in one line.
    Path("/var/lib/edge-embed/bundle").rename("/var/lib/edge-embed/bundle.away")
    cursor = _run(["journalctl", "--show-cursor", "-n", "1", "-o", "cat"], capture_output=True, text=True,
                            timeout=60).stdout.strip().rpartition("cursor: ")[2]
    refused = _run(["systemctl", "start", UNIT], capture_output=True, text=True, timeout=120)
    _run(["systemctl", "stop", UNIT], capture_output=True, timeout=120)
    lines = _run(["journalctl", "--no-pager", "-o", "cat", "-u", UNIT, f"--after-cursor={cursor}"],
                           capture_output=True, text=True, timeout=60).stdout.splitlines()
    report["without_bundle"] = {"rc": refused.returncode,
                                "errors": [line for line in lines if line.startswith("edge-embed: error:")]}
    Path("/var/lib/edge-embed/bundle.away").rename("/var/lib/edge-embed/bundle")

    report["journal"] = _run(["journalctl", "--no-pager", "-o", "cat", "-u", UNIT],
                                       capture_output=True, text=True, timeout=60).stdout.splitlines()[-80:]
    return report


def main() -> None:
    RESULTS.mkdir(exist_ok=True)
    try:
        report = probe()
    except Exception:  # noqa: BLE001 - the host test reads whatever went wrong
        report = {"error": traceback.format_exc()}
    (RESULTS / "probe.json").write_text(json.dumps(report, indent=2))
    _run(["systemctl", "poweroff", "--no-block"])


if __name__ == "__main__":
    main()
