#!/usr/bin/env bash
# Build the flystage train and serve images where no container registry and no public package
# index can be reached from inside a build (our build machines and CI; see docs in docker/README.md).
#
#   docker/build-offline.sh [base|wheelhouse|images|all|check|build-flags]     (default: all)
#
# 1. base:       a Debian bookworm base image made locally with debootstrap (no registry pull),
#                with Debian's Python 3.11; skipped when $BASE_IMAGE already exists.
# 2. wheelhouse: every pinned requirement downloaded on the host (the host's pip and its CA
#                bundle work; pip inside containers does not), for Linux x86_64 CPython 3.11;
#                skipped when the requirement files and $TORCH_SPEC have not changed.
# 3. images:     `docker build --network host`, with pip in the build reading the wheelhouse
#                from a loopback HTTP server (PIP_NO_INDEX + PIP_FIND_LINKS build arguments).
# Every image is built with --platform linux/amd64 (what SageMaker's instances run) and checked
# afterwards: the classic builder silently keeps a local base image of another platform.
# `check` only checks that the BUILD_IMAGES images exist and are linux/amd64.
# SageMaker runs Docker v2 schema 2 manifests only ("Unsupported manifest media type" otherwise):
# when buildx is what `docker build` runs, its provenance/SBOM attestations (which turn a push
# into an OCI image index) are turned off; `build-flags` prints those flags for the Makefile's
# online builds (nothing for the classic builder, which makes no attestations and refuses them).
#
# Settings (environment): BASE_IMAGE, DEBIAN_MIRROR, WHEELHOUSE, TORCH_SPEC, TRAIN_IMAGE,
# SERVE_IMAGE, BASELINE_IMAGE, HOST_PYTHON, WHEELHOUSE_PORT, PRETRAINED_WEIGHTS,
# BUILD_IMAGES (which images: train serve by default; baseline is the benchmark's).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

BASE_IMAGE="${BASE_IMAGE:-flystage-base:bookworm}"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
WHEELHOUSE="${WHEELHOUSE:-$REPO/wheelhouse}"
# Here the host's pip takes torch from local disk (a CUDA build that runs on the CPU); real
# users keep the Dockerfile default, CPU-only torch from the PyTorch CPU index.
TORCH_SPEC="${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}"
TRAIN_IMAGE="${TRAIN_IMAGE:-flystage-train:latest}"
SERVE_IMAGE="${SERVE_IMAGE:-flystage-serve:latest}"
# Benchmark-only (make bench-serve): the torch-eager baseline, built on the two images above.
BASELINE_IMAGE="${BASELINE_IMAGE:-flystage-baseline:latest}"
# The host Python whose pip downloads the wheelhouse (the project venv when there is one).
HOST_PYTHON="${HOST_PYTHON:-$( [[ -x "$REPO/.venv/bin/python" ]] && echo "$REPO/.venv/bin/python" || echo python3)}"
# A fixed port: the wheelhouse URL is a build argument, so it is part of Docker's layer cache key.
WHEELHOUSE_PORT="${WHEELHOUSE_PORT:-8737}"
PRETRAINED_WEIGHTS="${PRETRAINED_WEIGHTS:-}"
BUILD_IMAGES="${BUILD_IMAGES:-train serve}"
# Not a setting: SageMaker's ml.* instances run linux/amd64, and `flystage cloud push` refuses
# anything else.
PLATFORM=linux/amd64
REQUIREMENTS=(docker/train/requirements.txt docker/serve/requirements.txt docker/build-requirements.txt)

log() { printf '[build-offline] %s\n' "$*" >&2; }

need() {
    command -v "$1" >/dev/null 2>&1 || {
        log "error: '$1' not found; install it first ($2)"
        exit 2
    }
}

build_base() {
    need docker "apt-get install -y docker.io, then start dockerd"
    if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
        log "base image $BASE_IMAGE present, not rebuilt (docker rmi it to rebuild)"
        return
    fi
    need debootstrap "apt-get install -y debootstrap"
    # debootstrap makes a root file system for the host's architecture, and `docker import`
    # labels it so; the images must be amd64.
    if [[ "$(uname -m)" != x86_64 ]]; then
        log "error: this machine is $(uname -m); the base image must be linux/amd64 for SageMaker: build on an x86_64 machine, or build online (make images) with QEMU emulation"
        exit 2
    fi
    local root
    root="$(mktemp -d /var/tmp/flystage-base.XXXXXX)"
    # shellcheck disable=SC2064  # expand now: the trap must remove this very folder
    trap "rm -rf '$root'" RETURN
    log "debootstrap bookworm from $DEBIAN_MIRROR into $root"
    if ! debootstrap --variant=minbase \
        --include=python3,python3-venv,python3-pip,ca-certificates \
        bookworm "$root" "$DEBIAN_MIRROR" >"$root.log" 2>&1; then
        tail -20 "$root.log" >&2
        log "error: debootstrap failed (full log: $root.log)"
        exit 1
    fi
    rm -f "$root.log"
    # Keep the image small and reproducible: no apt lists or caches.
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb
    echo "deb $DEBIAN_MIRROR bookworm main" >"$root/etc/apt/sources.list"
    tar -C "$root" -c . | docker import --platform "$PLATFORM" \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["python3"]' \
        --message "debootstrap --variant=minbase bookworm + python3" \
        - "$BASE_IMAGE" >/dev/null
    log "made base image $BASE_IMAGE"
}

wheelhouse_key() {
    # Everything that decides the wheelhouse's content.
    { cat "${REQUIREMENTS[@]}"; echo "$TORCH_SPEC"; "$HOST_PYTHON" -c 'import sys; print(sys.version_info[:2])'; } \
        | sha256sum | cut -d' ' -f1
}

build_wheelhouse() {
    local key stamp
    key="$(wheelhouse_key)"
    stamp="$WHEELHOUSE/.complete"
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$key" ]]; then
        log "wheelhouse $WHEELHOUSE up to date, not downloaded again"
        return
    fi
    mkdir -p "$WHEELHOUSE"
    rm -f "$stamp"
    # Linux x86_64 CPython 3.11 (the images' Python); sdists are kept as such and built by the
    # images' builder stage, so the host needs no compiler.
    "$HOST_PYTHON" - <<'EOF'
import platform, sys
if sys.version_info[:2] != (3, 11) or platform.machine() != "x86_64":
    sys.exit(f"the host Python must be CPython 3.11 on x86_64 to download wheels for the images, not {platform.python_version()} {platform.machine()}: set HOST_PYTHON")
EOF
    log "downloading the pinned requirements into $WHEELHOUSE"
    for req in "${REQUIREMENTS[@]}"; do
        local torch=()
        # The train requirements (timm) need torch and torchvision: resolve them with TORCH_SPEC,
        # which is also how TORCH_SPEC itself gets into the wheelhouse.
        # shellcheck disable=SC2206  # TORCH_SPEC is a list of requirements
        [[ "$req" == docker/train/requirements.txt ]] && torch=($TORCH_SPEC)
        "$HOST_PYTHON" -m pip download --quiet --dest "$WHEELHOUSE" -r "$req" "${torch[@]}" 2> >(grep -v 'is ignored: it is neither' >&2)
    done
    echo "$key" >"$stamp"
    log "wheelhouse ready: $(find "$WHEELHOUSE" -type f | wc -l) files, $(du -sh "$WHEELHOUSE" | cut -f1)"
}

serve_wheelhouse() {
    # A loopback-only HTTP server; the builds reach it through --network host.
    local portfile
    portfile="$(mktemp)"
    "$HOST_PYTHON" - "$WHEELHOUSE" "$WHEELHOUSE_PORT" "$portfile" <<'EOF' &
import functools, http.server, sys
root, port, portfile = sys.argv[1], int(sys.argv[2]), sys.argv[3]
handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=root)
handler.log_message = lambda *args: None
server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
with open(portfile, "w") as f:
    f.write(str(server.server_address[1]))
server.serve_forever()
EOF
    SERVER_PID=$!
    trap 'kill "$SERVER_PID" 2>/dev/null || true' EXIT
    for _ in $(seq 50); do
        [[ -s "$portfile" ]] && break
        sleep 0.1
    done
    PORT="$(cat "$portfile")"
    rm -f "$portfile"
    [[ -n "$PORT" ]] || { log "error: the wheelhouse server did not start (is port $WHEELHOUSE_PORT in use? set WHEELHOUSE_PORT)"; exit 1; }
    log "wheelhouse served on http://127.0.0.1:$PORT/"
}

build_flags() {
    # buildx builds when its plugin answers and DOCKER_BUILDKIT does not ask for the classic
    # builder; the classic builder fails on these flags.
    if [[ "${DOCKER_BUILDKIT:-1}" != 0 ]] && docker buildx version >/dev/null 2>&1; then
        echo "--provenance=false --sbom=false"
    fi
}

warn_containerd_store() {
    # Docker's containerd image store pushes OCI manifests whatever the build flags.
    if docker info -f '{{json .DriverStatus}}' 2>/dev/null | grep -q 'io.containerd.snapshotter'; then
        log "warning: Docker's containerd image store is on: its pushes are OCI manifests, which SageMaker refuses (make push refuses them too). Turn it off (Docker Desktop: Settings > General, 'Use containerd for pulling and storing images'; dockerd: \"features\": {\"containerd-snapshotter\": false} in /etc/docker/daemon.json), then rebuild"
    fi
}

build_images() {
    need docker "apt-get install -y docker.io, then start dockerd"
    serve_wheelhouse
    local index="http://127.0.0.1:$PORT/"
    local attestations
    # shellcheck disable=SC2207  # two flags or none, no spaces inside
    attestations=($(build_flags))
    # No default attestations either where buildx reads this instead of the flags (bake, CI).
    export BUILDX_NO_DEFAULT_ATTESTATIONS=1
    local common=(--network host --platform "$PLATFORM" "${attestations[@]}"
        --build-arg "BASE_IMAGE=$BASE_IMAGE"
        --build-arg PIP_NO_INDEX=1
        --build-arg "PIP_FIND_LINKS=$index"
        --build-arg "TORCH_SPEC=$TORCH_SPEC"
        --build-arg "VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)"
        --build-arg "REVISION=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)")
    for which in $BUILD_IMAGES; do
        local tag start
        tag="$(image_tag "$which")"
        start=$(date +%s)
        log "building $tag"
        local extra=()
        [[ "$which" == train ]] && extra=(--build-arg "PRETRAINED_WEIGHTS=$PRETRAINED_WEIGHTS")
        [[ "$which" == baseline ]] && extra=(--build-arg "TRAIN_IMAGE=$TRAIN_IMAGE" --build-arg "SERVE_IMAGE=$SERVE_IMAGE")
        # train and serve are targets of docker/Dockerfile; the benchmark baseline has its own file.
        local dockerfile=(-f docker/Dockerfile --target "$which")
        [[ "$which" == baseline ]] && dockerfile=(-f docker/baseline/Dockerfile)
        docker build "${common[@]}" "${extra[@]}" "${dockerfile[@]}" -t "$tag" .
        check_platform "$tag"
        log "built $tag in $(( $(date +%s) - start )) s, $(docker image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.2f GB", $1/1e9}')"
    done
}

image_tag() {
    case "$1" in
        train) echo "$TRAIN_IMAGE" ;;
        serve) echo "$SERVE_IMAGE" ;;
        baseline) echo "$BASELINE_IMAGE" ;;
        *) log "error: unknown image '$1' (train, serve or baseline)"; exit 2 ;;
    esac
}

check_platform() {
    # The image's own config, as `flystage cloud push` reads it.
    local found
    found="$(docker image inspect -f '{{.Os}}/{{.Architecture}}' "$1")" || { log "error: no image $1: run make images"; exit 1; }
    if [[ "$found" != "$PLATFORM" ]]; then
        log "error: $1 is $found, not $PLATFORM (SageMaker cannot run it): is the base image $BASE_IMAGE $found? rebuild it on an x86_64 machine (docker rmi it, then make images)"
        exit 1
    fi
    log "$1 is $PLATFORM"
}

case "${1:-all}" in
    base) build_base ;;
    wheelhouse) build_wheelhouse ;;
    images) build_images; warn_containerd_store ;;
    all) build_base; build_wheelhouse; build_images; warn_containerd_store ;;
    check) for which in $BUILD_IMAGES; do tag="$(image_tag "$which")"; check_platform "$tag"; done; warn_containerd_store ;;
    build-flags) build_flags ;;
    *) log "usage: $0 [base|wheelhouse|images|all|check|build-flags]"; exit 2 ;;
esac
