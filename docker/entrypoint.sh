#!/bin/sh
# Entrypoint of the edge-embed images, and ExecStartPre of edge-embed.service.
#
#   serve [FLAGS]   prepare, then exec `edge-embed serve FLAGS` (the default command)
#   prepare         check the bundle; build TensorRT engines when EDGE_EMBED_WARM says so
#   health          exit 0 when the local server reports SERVING (the HEALTHCHECK)
#   -FLAG ...       serve with these flags
#   anything else   run it as is (edge-embed info, sh, ...)
#
# EDGE_EMBED_WARM: 1 runs `edge-embed warm` before serving, so the engines exist before
# health turns SERVING; 0 never; auto (the default) when EDGE_EMBED_BACKEND is tensorrt
# or this is a Jetson (/etc/nv_tegra_release). `warm` reads the same EDGE_EMBED_*
# settings as `serve`.
set -eu

bundle_flag() {
    # The value of --bundle among serve's flags, if given.
    while [ "$#" -gt 0 ]; do
        case "$1" in
            --bundle=*) echo "${1#--bundle=}"; return ;;
            --bundle) echo "${2:-}"; return ;;
        esac
        shift
    done
}

should_warm() {
    case "${EDGE_EMBED_WARM:-auto}" in
        1|yes|true) return 0 ;;
        0|no|false) return 1 ;;
        auto) [ "${EDGE_EMBED_BACKEND:-auto}" = tensorrt ] || [ -e /etc/nv_tegra_release ] ;;
        *) echo "edge-embed: error: EDGE_EMBED_WARM must be 1, 0 or auto, got '${EDGE_EMBED_WARM}'" >&2
           exit 2 ;;
    esac
}

health_address() {
    # A wildcard bind is reached on loopback.
    host="${EDGE_EMBED_HOST:-127.0.0.1}"
    case "$host" in
        0.0.0.0|'') host=127.0.0.1 ;;
        ::|'[::]') host='[::1]' ;;
        \[*) ;;
        *:*) host="[$host]" ;;
    esac
    echo "$host:${EDGE_EMBED_PORT:-50051}"
}

prepare() {
    bundle="$(bundle_flag "$@")"
    bundle="${bundle:-${EDGE_EMBED_BUNDLE:-}}"
    if [ -z "$bundle" ] || [ ! -f "$bundle/manifest.json" ]; then
        hint="${EDGE_EMBED_BUNDLE_HINT:-bake one in (--build-arg BUNDLE=DIR) or mount one (-v DIR:${bundle:-/bundle}:ro)}"
        echo "edge-embed: error: no bundle at ${bundle:-(EDGE_EMBED_BUNDLE is unset)}: $hint" >&2
        exit 3
    fi
    if should_warm; then
        edge-embed warm --bundle "$bundle"
    fi
}

command="${1:-serve}"
case "$command" in
    serve) [ "$#" -gt 0 ] && shift; prepare "$@"; exec edge-embed serve "$@" ;;
    -*) prepare "$@"; exec edge-embed serve "$@" ;;
    prepare) shift; prepare "$@" ;;
    health) shift; exec edge-embed health --server "$(health_address)" "$@" ;;
    *) exec "$@" ;;
esac
