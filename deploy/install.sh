#!/usr/bin/env bash
# Install edge-embed as a systemd service: a virtual environment with the runtime
# dependencies only, a system user, the unit, its environment file and a bundle.
#
#   sudo deploy/install.sh --bundle /path/to/bundle [--wheel edge_embed-*.whl] [--enable] [--now]
#
# Layout:
#   /opt/edge-embed/venv                      the runtime (--prefix moves /opt/edge-embed)
#   /opt/edge-embed/libexec/edge-embed-entrypoint   ExecStartPre: bundle check, engine build
#   /etc/systemd/system/edge-embed.service    the unit (+ edge-embed.service.d/jetson.conf on a Jetson)
#   /etc/edge-embed/edge-embed.env            settings; kept when it exists
#   /var/lib/edge-embed/bundle                the bundle; /var/lib/edge-embed/cache: engine cache
#
# On a Jetson (/etc/nv_tegra_release) ONNX Runtime comes from NVIDIA's Jetson wheel index
# (onnxruntime-gpu; PyPI has no aarch64 GPU build): --onnxruntime and --ort-index-url change it.
# --venv-only builds the virtual environment alone (the Dockerfiles use it). With --arch
# (amd64 or arm64) naming another architecture than this machine's, it is built for that
# one from its binary wheels, without running them (an arm64 image built on an x86 host
# installs natively instead of under emulation); the Python of both must be the same version.
# pip honours its usual environment (PIP_INDEX_URL, PIP_CERT, ...).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
prefix=/opt/edge-embed
source_dir=""
wheel=""
bundle=""
enable=0
now=0
venv_only=0
arch=""
onnxruntime=""
ort_index_url="https://pypi.jetson-ai-lab.io/jp6/cu126"
user=edge-embed
state=/var/lib/edge-embed
config=/etc/edge-embed
units=/etc/systemd/system

usage() {
    sed -n '2,20s/^# \{0,1\}//p' "$0"
    echo "options: --prefix DIR --wheel FILE --source DIR --bundle DIR --enable --now --venv-only"
    echo "         --arch amd64|arm64 --onnxruntime PACKAGE --ort-index-url URL"
}

die() {
    echo "install.sh: error: $*" >&2
    exit 1
}

while [ "$#" -gt 0 ]; do
    case "$1" in
        --prefix) prefix="${2:?}"; shift 2 ;;
        --wheel) wheel="${2:?}"; shift 2 ;;
        --source) source_dir="${2:?}"; shift 2 ;;
        --bundle) bundle="${2:?}"; shift 2 ;;
        --enable) enable=1; shift ;;
        --now) enable=1; now=1; shift ;;
        --venv-only) venv_only=1; shift ;;
        --arch) arch="${2:?}"; shift 2 ;;
        --onnxruntime) onnxruntime="${2:?}"; shift 2 ;;
        --ort-index-url) ort_index_url="${2:?}"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done

jetson=0
[ -e /etc/nv_tegra_release ] && jetson=1
if [ -z "$onnxruntime" ]; then
    if [ "$jetson" = 1 ]; then onnxruntime="onnxruntime-gpu"; else onnxruntime="onnxruntime"; fi
fi

machine_arch() {
    case "$(uname -m)" in
        x86_64|amd64) echo amd64 ;;
        aarch64|arm64) echo arm64 ;;
        *) uname -m ;;
    esac
}

# The target architecture's wheel platform tags when it is not this machine's, else empty.
cross_platform=""
if [ -n "$arch" ] && [ "$arch" != "$(machine_arch)" ]; then
    case "$arch" in
        amd64) cross_platform=x86_64 ;;
        arm64) cross_platform=aarch64 ;;
        *) die "--arch must be amd64 or arm64, got '$arch'" ;;
    esac
    [ "$venv_only" = 1 ] || die "--arch $arch on a $(machine_arch) machine builds a virtual environment only (add --venv-only)"
fi

if [ -n "$wheel" ]; then
    [ -f "$wheel" ] || die "no wheel at $wheel"
    target="$wheel"
else
    source_dir="${source_dir:-$(dirname "$here")}"
    [ -f "$source_dir/pyproject.toml" ] || die "no --wheel given and no pyproject.toml in $source_dir"
    target="$source_dir"
fi
if [ "$venv_only" = 0 ]; then
    [ "$(id -u)" = 0 ] || die "run as root (it creates a user and installs a systemd unit)"
    if [ -n "$bundle" ] && [ ! -f "$bundle/manifest.json" ]; then
        die "$bundle is not a bundle (no manifest.json)"
    fi
fi

install_venv() {
    local venv="$prefix/venv" pip requirements
    python3 -m venv "$venv"
    pip=("$venv/bin/python" -m pip --disable-pip-version-check --no-cache-dir)
    "${pip[@]}" install --quiet "pip>=23"
    # edge-embed itself without dependencies, then its runtime requirements with the
    # ONNX Runtime build this machine needs in place of the CPU package.
    "${pip[@]}" install --quiet --force-reinstall --no-deps "$target"
    requirements="$("$venv/bin/python" - <<'PY'
import re
from importlib.metadata import requires

for requirement in requires("edge-embed") or []:
    name = re.split(r"[\s;<>=!~\[(]", requirement, maxsplit=1)[0].lower()
    if "extra ==" not in requirement and name != "onnxruntime":
        print(requirement)
PY
)"
    local extra=()
    if [ "$onnxruntime" != onnxruntime ]; then
        extra=(--extra-index-url "$ort_index_url")
    fi
    mapfile -t requirements <<<"$requirements"
    local constraints=()
    if [ -f "$here/constraints.txt" ]; then
        constraints=(--constraint "$here/constraints.txt")  # the tested ONNX Runtime
    fi
    if [ -z "$cross_platform" ]; then
        "${pip[@]}" install --quiet "${extra[@]}" "${constraints[@]}" "${requirements[@]}" "$onnxruntime"
        "$venv/bin/edge-embed" --help >/dev/null
        return
    fi
    # Another architecture: its binary wheels straight into site-packages (pip installs
    # foreign wheels only with --target), for every manylinux glibc level up to this one's.
    local site python_version glibc platforms=()
    site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    python_version="$("$venv/bin/python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
    glibc="$("$venv/bin/python" -c 'import platform; print(platform.libc_ver()[1].split(".")[1])')"
    for ((minor = 17; minor <= glibc; minor++)); do
        platforms+=(--platform "manylinux_2_${minor}_${cross_platform}")
    done
    "${pip[@]}" install --quiet --only-binary=:all: --implementation cp --python-version "$python_version" \
        "${platforms[@]}" --platform "manylinux2014_${cross_platform}" --target "$site" \
        "${extra[@]}" "${constraints[@]}" "${requirements[@]}" "$onnxruntime"
    rm -rf "${site:?}/bin"  # their console scripts, written for this machine's interpreter
    "$venv/bin/python" - "$site" "$cross_platform" <<'PY'
import sys
from pathlib import Path

site, machine = Path(sys.argv[1]), sys.argv[2]
wanted = {"x86_64": b"\x3e\x00", "aarch64": b"\xb7\x00"}[machine]  # ELF e_machine


def header(path: Path) -> bytes:
    with path.open("rb") as handle:
        return handle.read(20)


built = [h for h in map(header, (p for p in site.rglob("*.so*") if p.is_file())) if h[:4] == b"\x7fELF"]
wrong = [h for h in built if h[18:20] != wanted]
if not built or wrong:
    sys.exit(f"install.sh: error: {len(wrong)} of {len(built)} shared libraries are not built for {machine}")
PY
}

install_system() {
    if ! getent passwd "$user" >/dev/null; then
        useradd --system --user-group --home-dir "$state" --no-create-home --shell /usr/sbin/nologin "$user"
    fi
    install -d -m 0750 -o "$user" -g "$user" "$state" "$state/cache"
    if [ -n "$bundle" ]; then
        rm -rf "$state/bundle.new"
        cp -R "$bundle" "$state/bundle.new"
        chown -R "$user:$user" "$state/bundle.new"
        rm -rf "$state/bundle"
        mv "$state/bundle.new" "$state/bundle"
    elif [ ! -f "$state/bundle/manifest.json" ]; then
        echo "install.sh: no bundle yet: the service will not start until $state/bundle holds one" >&2
    fi

    install -d "$prefix/libexec"
    install -m 0755 "$here/../docker/entrypoint.sh" "$prefix/libexec/edge-embed-entrypoint"
    install -d "$units"
    sed "s|/opt/edge-embed|$prefix|g" "$here/systemd/edge-embed.service" >"$units/edge-embed.service"
    chmod 0644 "$units/edge-embed.service"
    if [ "$jetson" = 1 ]; then
        install -D -m 0644 "$here/systemd/edge-embed.service.d/jetson.conf" "$units/edge-embed.service.d/jetson.conf"
    fi
    install -d -m 0755 "$config"
    if [ ! -e "$config/edge-embed.env" ]; then
        install -m 0640 -g "$user" "$here/systemd/edge-embed.env" "$config/edge-embed.env"
    fi

    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload
    fi
    if [ "$enable" = 1 ]; then
        systemctl enable edge-embed.service
    fi
    if [ "$now" = 1 ]; then
        systemctl restart edge-embed.service
    fi
}

install_venv
if [ "$venv_only" = 0 ]; then
    install_system
fi
echo "installed edge-embed in $prefix/venv ($onnxruntime)"
