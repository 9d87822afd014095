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
# --venv-only builds the virtual environment alone (the Dockerfiles use it).
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
onnxruntime=""
ort_index_url="https://pypi.jetson-ai-lab.io/jp6/cu126"
user=edge-embed
state=/var/lib/edge-embed
config=/etc/edge-embed
units=/etc/systemd/system

usage() {
    sed -n '2,20s/^# \{0,1\}//p' "$0"
    echo "options: --prefix DIR --wheel FILE --source DIR --bundle DIR --enable --now --venv-only"
    echo "         --onnxruntime PACKAGE --ort-index-url URL"
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
    "${pip[@]}" install --quiet "${extra[@]}" "${constraints[@]}" "${requirements[@]}" "$onnxruntime"
    "$venv/bin/edge-embed" --help >/dev/null
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
