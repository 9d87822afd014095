"""deploy/systemd under a real systemd: a Debian rootfs, the project installed by
deploy/install.sh, booted with systemd-nspawn (systemd as PID 1, private network).

A probe unit inside (tests/deploy/nspawn_probe.py) waits for READY, checks health and an
Embed call, hangs the server with SIGSTOP so the watchdog must restart it, stops it, tries
a start without a bundle, writes what it saw to a bind-mounted folder and powers off.
systemd-analyze verifies the installed unit (--root) and scores its hardening.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest

from tests.deploy.host import (
    CACHE,
    REPO,
    debian_rootfs,
    extract,
    host_ca_bundle,
    record,
    require,
    run,
    skip_without_system,
)
from tests.deploy.images import project_wheel, stage_context

pytestmark = pytest.mark.deploy

ROOTFS_PACKAGES = ["systemd", "systemd-sysv", "dbus", "python3", "python3-venv", "ca-certificates", "passwd"]
PROBE_UNIT = """\
[Unit]
Description=edge-embed deployment probe
After=multi-user.target

[Service]
Type=oneshot
ExecStart=/opt/edge-embed/venv/bin/python /usr/local/lib/edge-embed-probe/nspawn_probe.py
"""
ACCEPTABLE = {"PERFECT", "SAFE", "OK"}


def nspawn(root: Path, *args: str) -> list[str]:
    return ["systemd-nspawn", "--quiet", "-D", str(root), "--register=no", "--keep-unit", *args]


@pytest.fixture(scope="module")
def installed_root(minilm_bundle):
    """A bookworm rootfs with systemd, after `deploy/install.sh --wheel ... --bundle ... --enable`."""
    skip_without_system()
    require("systemd-nspawn", "systemd-analyze")
    context = stage_context(minilm_bundle)
    wheel = project_wheel(context)
    tarball = debian_rootfs("nspawn", "amd64", ROOTFS_PACKAGES)
    folder = CACHE / "nspawn" / str(os.getpid())
    for stale in folder.parent.glob("*"):  # left by runs that were killed
        if stale.name.isdigit() and not Path(f"/proc/{stale.name}").exists():
            shutil.rmtree(stale, ignore_errors=True)
    root = extract(tarball, folder / "root")
    binds = [f"--bind-ro={context}:/mnt/src", f"--bind-ro={wheel.parent}:/mnt/wheels"]
    if ca := host_ca_bundle():
        binds += [f"--bind-ro={ca}:/mnt/host-ca.crt", "--setenv=PIP_CERT=/mnt/host-ca.crt"]
    # Not booted, sharing the host's network so pip can reach its index.
    run(nspawn(root, *binds, "bash", "/mnt/src/deploy/install.sh", "--wheel", f"/mnt/wheels/{wheel.name}",
               "--bundle", "/mnt/src/bundle", "--enable"), 900)
    try:
        yield root
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_install_sh_lays_out_venv_unit_env_file_user_and_bundle(installed_root):
    root = installed_root
    assert os.access(root / "opt/edge-embed/venv/bin/edge-embed", os.X_OK)
    assert os.access(root / "opt/edge-embed/libexec/edge-embed-entrypoint", os.X_OK)
    unit = (root / "etc/systemd/system/edge-embed.service").read_text()
    assert unit == (REPO / "deploy/systemd/edge-embed.service").read_text()
    assert (root / "etc/systemd/system/multi-user.target.wants/edge-embed.service").is_symlink()
    assert not (root / "etc/systemd/system/edge-embed.service.d").exists()  # no Jetson here
    env_file = root / "etc/edge-embed/edge-embed.env"
    assert env_file.read_text() == (REPO / "deploy/systemd/edge-embed.env").read_text()
    assert oct(env_file.stat().st_mode & 0o777) == "0o640"
    user = next(line for line in (root / "etc/passwd").read_text().splitlines() if line.startswith("edge-embed:"))
    assert user.split(":")[6] == "/usr/sbin/nologin"
    assert (root / "var/lib/edge-embed/bundle/manifest.json").is_file()
    site = next((root / "opt/edge-embed/venv/lib").glob("python3*/site-packages"))
    installed = {p.name.split("-")[0].lower() for p in site.glob("*.dist-info")}
    assert {"edge_embed", "onnxruntime", "grpcio", "tokenizers", "numpy"} <= installed
    assert not installed & {"torch", "transformers", "onnx", "onnxscript"}, installed


def _verify(root: Path) -> None:
    done = run(["systemd-analyze", "verify", "--recursive-errors=yes", f"--root={root}", "edge-embed.service"], 120,
               check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "edge-embed" not in done.stdout + done.stderr, done.stdout + done.stderr


def test_installed_unit_verifies_with_and_without_the_jetson_drop_in(installed_root):
    _verify(installed_root)
    drop_ins = installed_root / "etc/systemd/system/edge-embed.service.d"
    drop_ins.mkdir()
    try:
        shutil.copy2(REPO / "deploy/systemd/edge-embed.service.d/jetson.conf", drop_ins)
        _verify(installed_root)
    finally:
        shutil.rmtree(drop_ins)


def security_level(*args: str) -> tuple[float, str]:
    done = run(["systemd-analyze", "security", "--offline=yes", "--no-pager", *args], 120, check=False)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", done.stdout)
    assert match, done.stdout + done.stderr
    return float(match.group(1)), match.group(2)


def test_installed_unit_hardening_scores_ok(installed_root):
    score, level = security_level(f"--root={installed_root}", "edge-embed.service")
    record("systemd_security_exposure", f"{score} {level}")
    assert level in ACCEPTABLE, f"exposure {score} {level}"


def test_unit_boots_serves_survives_a_hang_and_stops(installed_root):
    root = installed_root
    probe_dir = root / "usr/local/lib/edge-embed-probe"
    probe_dir.mkdir(parents=True)
    shutil.copy2(REPO / "tests/deploy/nspawn_probe.py", probe_dir)
    (root / "etc/systemd/system/edge-embed-probe.service").write_text(PROBE_UNIT)
    (root / "etc/systemd/system/multi-user.target.wants/edge-embed-probe.service").symlink_to(
        "/etc/systemd/system/edge-embed-probe.service")
    results = root.parent / "results"
    results.mkdir(parents=True)

    started = time.monotonic()
    booted = run(nspawn(root, "--boot", "--private-network", f"--bind={results}:/results"), 600, check=False)
    record("nspawn_boot_to_poweroff_s", round(time.monotonic() - started, 1))
    log = booted.stdout + booted.stderr
    assert (results / "probe.json").is_file(), f"no probe report (nspawn exit {booted.returncode}):\n{log[-3000:]}"
    report = json.loads((results / "probe.json").read_text())
    assert "error" not in report, report["error"]
    journal = "\n".join(report["journal"])

    assert report["ready"], report
    assert report["unit"]["Type"] == "notify" and report["unit"]["StatusText"].startswith("serving ")
    assert "code=exited ; status=0 }" in report["unit"]["ExecStartPre"]  # prepare: the bundle checked, no engines
    assert "warmed" not in journal
    assert report["health"] == [0, "SERVING"]
    assert report["dim"] == 384
    process = report["process"]
    assert process["Uid"].split()[0] == str(process["service_uid"])
    assert process["NoNewPrivs"] == "1" and process["Seccomp"] == "2"
    assert int(process["CapEff"], 16) == 0 and int(process["CapBnd"], 16) == 0
    record("nspawn_ready_after_boot_s", round(report["ready_after_boot_s"], 2))
    record("nspawn_ready_after_unit_start_s", round(report["ready_after_start_s"], 2))

    watchdog = report["watchdog"]
    assert watchdog["restarted"], journal
    assert watchdog["unit"]["NRestarts"] == "1" and watchdog["unit"]["ActiveState"] == "active"
    assert "Watchdog timeout (limit 20s)" in journal and "Failed with result 'watchdog'" in journal
    record("nspawn_watchdog_restart_s", watchdog["seconds"])
    assert report["health_after_restart"][0] == 0

    stop = report["stop"]
    assert stop["rc"] == 0 and stop["Result"] == "success" and stop["ExecMainStatus"] == "0", stop
    assert stop["ActiveState"] == "inactive"
    assert "stopped after" in journal

    refused = report["without_bundle"]
    assert refused["rc"] != 0
    assert refused["errors"] and set(refused["errors"]) == {
        "edge-embed: error: no bundle at /var/lib/edge-embed/bundle: install one with deploy/install.sh --bundle DIR"
    }, refused
