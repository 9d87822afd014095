"""What the deployment tests need from this machine, and the Debian root filesystems they build.

Everything heavy is cached under .cache/deploy, keyed by what makes it, so a rerun reuses it
and a change rebuilds it. Every external command runs under `timeout -k`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache" / "deploy"
VENV_BIN = Path(sys.executable).parent
TOOLS_HINT = "run `bash scripts/deploy-tools.sh` (`bash scripts/setup.sh test` does)"
SUITE = "bookworm"
BINFMT = Path("/proc/sys/fs/binfmt_misc")


def system_unavailable_reason() -> str | None:
    """Why images, emulation and systemd-nspawn cannot be had here at all, else None.

    Where they can (root on a machine with apt), missing tools are a failure, not a skip.
    """
    if os.geteuid() != 0:
        return "building images, rootfs and booting systemd-nspawn need root"
    if shutil.which("apt-get") is None:
        return "the deployment tools come from Debian's apt, which this machine lacks"
    return None


def skip_without_system() -> None:
    if reason := system_unavailable_reason():
        pytest.skip(reason)


def require(*commands: str) -> dict[str, str]:
    """Paths of the commands (the venv's own scripts first); fail, naming the fix, if any is missing."""
    found, missing = {}, []
    for command in commands:
        path = VENV_BIN / command if (VENV_BIN / command).exists() else shutil.which(command)
        if path is None:
            missing.append(command)
        else:
            found[command] = str(path)
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: {TOOLS_HINT}", pytrace=False)
    return found


def run(argv: list[str], timeout: float, *, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run under `timeout -k 10`, capturing text output; a failure shows the command's output."""
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    kwargs.setdefault("cwd", "/")
    done = subprocess.run(["timeout", "-k", "10", str(int(timeout)), *argv], check=False, **kwargs)
    if check and done.returncode != 0:
        tail = "\n".join(((done.stdout or "") + (done.stderr or "")).splitlines()[-40:])
        timed_out = " (timed out)" if done.returncode in (124, 137) else ""
        raise AssertionError(f"{' '.join(argv[:4])} ... exited {done.returncode}{timed_out}:\n{tail}")
    return done


def enable_arm64_emulation() -> str | None:
    """Register qemu-aarch64 with binfmt_misc (needed after each boot); the reason it cannot be, or None."""
    if not BINFMT.is_dir():
        return "this kernel has no binfmt_misc, so arm64 binaries cannot run under emulation"
    require("update-binfmts", "qemu-aarch64-static")
    if not (BINFMT / "register").exists():
        run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)], 30)
    if not (BINFMT / "qemu-aarch64").exists():
        run(["update-binfmts", "--enable", "qemu-aarch64"], 30)
    entry = (BINFMT / "qemu-aarch64").read_text()
    if not entry.startswith("enabled"):
        run(["update-binfmts", "--enable", "qemu-aarch64"], 30)
    return None


def host_ca_bundle() -> Path | None:
    """The CA bundle this machine's pip trusts, if one is configured."""
    for name in ("PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"):
        value = os.environ.get(name)
        if value and Path(value).is_file():
            return Path(value)
    done = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.cert"], capture_output=True,
                          text=True, cwd="/", check=False)
    value = done.stdout.strip()
    return Path(value) if done.returncode == 0 and value and Path(value).is_file() else None


def debian_sources() -> list[str]:
    """One-line `deb` entries for Debian's bookworm suites, from this machine's apt configuration."""
    entries: list[str] = []
    files = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in files:
        if not path.is_file():
            continue
        text = path.read_text()
        if path.suffix == ".sources":
            for stanza in text.split("\n\n"):
                fields = {}
                for line in stanza.splitlines():
                    key, sep, value = line.partition(":")
                    if sep and not line.startswith((" ", "#")):
                        fields[key.strip().lower()] = value.strip()
                if "deb" not in fields.get("types", "").split():
                    continue
                for uri in fields.get("uris", "").split():
                    for suite in fields.get("suites", "").split():
                        entries.append(f"deb {uri} {suite} {fields.get('components', 'main')}")
        elif path.suffix in ("", ".list"):
            entries += [line.strip() for line in text.splitlines() if line.strip().startswith("deb ")]
    wanted = {SUITE, f"{SUITE}-updates", f"{SUITE}-security"}
    debian = []
    for entry in entries:
        words = [w for w in entry.split() if not w.startswith("[")]
        if len(words) >= 4 and words[2] in wanted and "main" in words[3:]:
            debian.append(f"deb {words[1]} {words[2]} main")
    if not any(e.split()[2] == SUITE for e in debian):
        pytest.fail("apt has no Debian bookworm source configured (/etc/apt/sources.list*)", pytrace=False)
    return sorted(set(debian), key=debian.index)


_SLIM = [f"--dpkgopt=path-exclude=/usr/share/{d}/*" for d in ("doc", "man", "info", "locale")] + [
    "--dpkgopt=path-include=/usr/share/doc/*/copyright",
    "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",  # merged /usr without usrmerge (and perl)
]


def debian_rootfs(name: str, arch: str, packages: list[str]) -> Path:
    """A bookworm rootfs tarball (mmdebstrap, variant apt + `packages`), built once per key."""
    require("mmdebstrap", "arch-test")
    sources = debian_sources()
    key = hashlib.sha256("\n".join([SUITE, arch, *packages, *sources, *_SLIM]).encode()).hexdigest()[:12]
    folder = CACHE / "rootfs"
    target = folder / f"{name}-{arch}-{key}.tar"
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(f"{name}-{arch}-*.tar"):
        stale.unlink()
    partial = target.with_suffix(f".partial-{os.getpid()}.tar")
    run(["mmdebstrap", "--mode=root", "--variant=apt", f"--architectures={arch}", f"--include={','.join(packages)}",
         *_SLIM, SUITE, str(partial), *sources], 1200)
    partial.rename(target)
    return target


def extract(tarball: Path, dest: Path) -> Path:
    dest.mkdir(parents=True)
    run(["tar", "-C", str(dest), "--numeric-owner", "-xf", str(tarball)], 300)
    return dest


def tree_digest(paths: list[Path], root: Path) -> str:
    """A digest of these files' relative names and contents."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def record(name: str, value) -> None:
    """Keep a measured figure in .cache/deploy/measurements.json (image sizes, timings, cosines)."""
    import json

    path = CACHE / "measurements.json"
    CACHE.mkdir(parents=True, exist_ok=True)
    data = json.loads(path.read_text()) if path.is_file() else {}
    data[name] = value
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
