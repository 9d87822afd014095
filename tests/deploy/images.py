"""Building the images with buildah and running them with podman, in storage of our own.

The storage lives under .cache/deploy/containers, so built images survive between runs;
each is tagged with a digest of what went into it and rebuilt when that changes. No
command here makes a bridge network: containers run with --network=host or none.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .host import CACHE, REPO, debian_rootfs, host_ca_bundle, require, run, tree_digest

IMAGE = "localhost/edge-embed-test"
BASE = "localhost/edge-embed-test-base"
# What the Dockerfiles copy from the build context, and what deploy/install.sh installs.
CONTEXT_PATHS = ["pyproject.toml", "README.md", "edge_embed", "backends", "export", "docker", "deploy/install.sh",
                 "deploy/constraints.txt", "deploy/systemd"]
BASE_PACKAGES = ["python3", "python3-venv", "ca-certificates", "passwd"]
# ONNX Runtime's INT8 kernels run ~8x faster under qemu as a Neoverse N1 (Graviton2,
# Ampere Altra: dot-product, no SVE) than as qemu's default "max" CPU, whose SVE is slow.
QEMU_CPU = "neoverse-n1"
HOST_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())


def _source_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z", "--", *CONTEXT_PATHS],
                            cwd=REPO, capture_output=True, text=True, check=True).stdout
    return [REPO / name for name in listed.split("\0") if name and (REPO / name).is_file()]


def stage_context(bundle: Path) -> Path:
    """A build context as a clean checkout has it (what the Dockerfiles copy) plus `bundle`
    at ./bundle (the files its manifest names, INT8 only); cached by content."""
    files = _source_files()
    bundle_files = _bundle_files(bundle)
    key = tree_digest(files, REPO) + tree_digest(bundle_files, bundle)
    target = CACHE / "contexts" / key / "context"
    if (target / ".complete").is_file():
        return target
    shutil.rmtree(CACHE / "contexts", ignore_errors=True)
    for path in files:
        dest = target / path.relative_to(REPO)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest)
    (target / "bundle").mkdir()
    for path in bundle_files:
        shutil.copy2(path, target / "bundle" / path.name)
    _keep_only_int8(target / "bundle" / "manifest.json")
    (target / ".complete").touch()
    return target


def context_key(context: Path) -> str:
    return context.parent.name


def _bundle_files(bundle: Path) -> list[Path]:
    manifest = json.loads((bundle / "manifest.json").read_text())
    names = ["manifest.json", *manifest["files"], manifest["variants"]["int8"]["file"],
             *manifest["variants"]["int8"].get("external_data", [])]
    return [bundle / name for name in names]


def _keep_only_int8(manifest_path: Path) -> None:
    """The manifest of a bundle that ships its INT8 variant alone (smaller image)."""
    manifest = json.loads(manifest_path.read_text())
    manifest["variants"] = {"int8": manifest["variants"]["int8"]}
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")


def project_wheel(context: Path) -> Path:
    """The edge-embed wheel built from a staged context (kept beside it)."""
    wheels = context.parent / "wheels"
    found = sorted(wheels.glob("edge_embed-*.whl"))
    if found:
        return found[0]
    run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(wheels), str(context)], 300)
    return min(wheels.glob("edge_embed-*.whl"))


@dataclass
class Containers:
    """buildah and podman over one private storage (overlay) and run root."""

    root: Path
    runroot: Path

    @classmethod
    def create(cls) -> Containers:
        require("buildah", "podman", "runc")
        digest = hashlib.sha256(str(REPO).encode()).hexdigest()[:8]
        runroot = Path("/run") / f"edge-embed-deploy-{digest}"
        return cls(root=CACHE / "containers", runroot=runroot)

    @property
    def _storage(self) -> list[str]:
        return ["--root", str(self.root), "--runroot", str(self.runroot), "--storage-driver", "overlay"]

    def buildah(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        return run(["buildah", *self._storage, *args], timeout, check=check)

    def podman_argv(self, *args: str) -> list[str]:
        return ["podman", *self._storage, "--runtime", "runc", "--cgroup-manager", "cgroupfs",
                "--events-backend", "file", "--tmpdir", str(self.runroot / "libpod"), *args]

    def podman(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        return run(self.podman_argv(*args), timeout, check=check)

    def exists(self, image: str) -> bool:
        return self.buildah("inspect", "--type", "image", image, check=False).returncode == 0

    def size(self, image: str) -> int:
        return int(self.podman("image", "inspect", "--format", "{{.Size}}", image).stdout.strip())

    def config(self, image: str) -> dict:
        return json.loads(self.buildah("inspect", "--type", "image", image).stdout)

    def drop_stale(self, prefix: str, keep: set[str]) -> None:
        """Remove the images named `prefix`... other than `keep`, then layers nothing uses."""
        listed = self.buildah("images", "--format", "{{.Name}}:{{.Tag}}", check=False).stdout.split()
        for name in listed:
            if name.startswith(prefix) and name not in keep:
                self.buildah("rmi", "--force", name, check=False)
        self.buildah("rmi", "--prune", check=False)

    def base_image(self, arch: str) -> str:
        """A local Debian base image for `arch`, from a rootfs tarball (no registry is reachable)."""
        tarball = debian_rootfs("image-base", arch, BASE_PACKAGES)
        tag = f"{BASE}:{arch}-{tarball.stem.rsplit('-', 1)[1]}"
        if self.exists(tag):
            return tag
        self.drop_stale(f"{BASE}:{arch}", keep={tag})
        container = self.buildah("from", "scratch").stdout.strip()
        try:
            self.buildah("add", container, str(tarball), "/", timeout=600)
            self.buildah("config", "--arch", arch, "--os", "linux", "--env", "LANG=C.UTF-8", "--cmd", "/bin/bash",
                         container)
            self.buildah("commit", "--rm", container, tag, timeout=600)
        except BaseException:
            self.buildah("rm", container, check=False)
            raise
        return tag

    def build(self, dockerfile: str, context: Path, tag: str, arch: str, base: str, *, bundle: bool,
              timeout: float, build_base: str | None = None) -> str:
        """Build `dockerfile` of the staged context for `arch` on `base`, unless `tag` exists;
        `build_base`: the base of the build stage, which runs on this host's architecture."""
        if self.exists(tag):
            return tag
        args = ["build", "--isolation", "chroot", "--network", "host", "--pull=never", "--layers",
                "--format", "docker", "--platform", f"linux/{arch}", "--build-arg", f"BASE_IMAGE={base}",
                "--build-arg", f"BUILD_BASE_IMAGE={build_base or base}",
                "--build-arg", f"BUILDPLATFORM=linux/{HOST_ARCH}",  # BuildKit sets it, buildah 1.28 does not
                "--ignorefile", str(context / "docker" / "Dockerfile.dockerignore"),
                "-f", str(context / dockerfile), "-t", tag]
        if bundle:
            args += ["--build-arg", "BUNDLE=bundle"]
        if ca := host_ca_bundle():
            args += ["--secret", f"id=pip-cert,src={ca}", "--build-arg", "PIP_CERT=/run/secrets/pip-cert"]
        self.buildah(*args, str(context), timeout=timeout)
        return tag


@dataclass
class RunningContainer:
    """One `podman run` in the foreground of a `timeout -k` process, logs in a file."""

    containers: Containers
    name: str
    process: subprocess.Popen
    log: Path

    @property
    def output(self) -> str:
        lines = self.log.read_text(errors="replace").splitlines()
        # podman's complaints that it cannot schedule healthcheck timers without systemd
        return "\n".join(line for line in lines if "systemd connection" not in line)

    def healthcheck(self) -> bool:
        """Run the image's HEALTHCHECK now (podman healthcheck run); True when healthy."""
        done = self.containers.podman("healthcheck", "run", self.name, timeout=120, check=False)
        return done.returncode == 0

    def wait_healthy(self, timeout: float, step: float = 2.0) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.process.poll() is not None:
                raise AssertionError(f"container {self.name} exited {self.process.returncode}:\n{self.output}")
            if self.healthcheck():
                return time.monotonic() - started
            time.sleep(step)
        raise AssertionError(f"container {self.name} not healthy after {timeout:.0f} s:\n{self.output}")

    def stop(self, grace: int = 30) -> int:
        """SIGTERM (podman stop), then the container's exit code."""
        self.containers.podman("stop", "--time", str(grace), self.name, timeout=grace + 60, check=False)
        return self.process.wait(grace + 60)


@contextlib.contextmanager
def running(containers: Containers, image: str, name: str, *, timeout: float, options: list[str] = (),
            command: list[str] = ()):
    """Run `image` (host network, runc limits this machine needs); always removed afterwards."""
    log = CACHE / "logs" / f"{name.rsplit('-', 1)[0]}.log"  # the last run's, without the pid
    log.parent.mkdir(parents=True, exist_ok=True)
    containers.podman("rm", "--force", name, check=False)
    argv = containers.podman_argv(
        "run", "--rm", "--name", name, "--network=host", "--ulimit", "nofile=1024:1024", "--ulimit",
        "nproc=1024:1024", "--health-interval=disable", *options, image, *command)
    with open(log, "w") as out:
        process = subprocess.Popen(["timeout", "-k", "10", str(int(timeout)), *argv], stdout=out,
                                   stderr=subprocess.STDOUT, cwd="/")
    try:
        yield RunningContainer(containers, name, process, log)
    finally:
        if process.poll() is None:
            containers.podman("rm", "--force", "--time", "5", name, check=False)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
