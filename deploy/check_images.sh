#!/usr/bin/env bash
# Build and run the CPU image on this machine, from nothing but Debian's and PyPI's packages:
#   1. a Debian bookworm base made with debootstrap, imported as a docker image;
#   2. docker/Dockerfile.cpu built on it, with this machine's torch wheel and CA bundle handed in
#      through docker/build-extra/ (the build stage only; removed again when this script ends);
#   3. the image run alone (host networking) until its healthcheck passes, then a steered chat
#      request with the openai SDK;
#   4. docker-compose.yml's `scale` profile (replicas behind nginx), checked the same way.
# Needs root (debootstrap, dockerd). Slow (minutes, not part of CI): see deploy/README.md.
#
#   sudo deploy/check_images.sh            # everything
#   KEEP=1 deploy/check_images.sh          # leave the containers running afterwards
# Settings (environment): WORK_DIR (debootstrap tree, logs; default /var/tmp/fasb-images),
# BASE_TAG, IMAGE_TAG, LB_TAG, MIRROR, PORT (the single container's, host network), LB_PORT,
# REPLICAS, TORCH_VERSION, CA_BUNDLE (default: pip's `global.cert`, else Debian's bundle),
# PYTHON (a Python with the openai package; default: the repository's .venv), THREADS (torch
# threads of the single container; default all cores: on a busy shared machine give THREADS=1,
# spinning threads that wait for a core slow decoding down many times over).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK_DIR=${WORK_DIR:-/var/tmp/fasb-images}
BASE_TAG=${BASE_TAG:-fasb-debian:bookworm}
IMAGE_TAG=${IMAGE_TAG:-fasb-server:cpu}
LB_TAG=${LB_TAG:-fasb-nginx:bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
PORT=${PORT:-18000}
LB_PORT=${LB_PORT:-18080}
REPLICAS=${REPLICAS:-2}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
EXTRA=$REPO/docker/build-extra
CONTAINER=fasb-check
PROJECT=fasbcheck
NICE="nice -n 10"

log() { printf '\n== %s  %s\n' "$(date -u +%H:%M:%S)" "$*"; }
die() { printf 'check_images: %s\n' "$*" >&2; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

[ "$(id -u)" = 0 ] || die "run as root (debootstrap and dockerd need it)"
"$PYTHON" -c 'import openai' 2>/dev/null || die "$PYTHON has no openai package (set PYTHON=...)"
mkdir -p "$WORK_DIR"

ensure_tools() {
    local missing=()
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    command -v dockerd >/dev/null || missing+=(docker.io)
    if ! docker compose version >/dev/null 2>&1 && ! command -v docker-compose >/dev/null; then
        missing+=(docker-compose)
    fi
    if [ ${#missing[@]} -gt 0 ]; then
        log "apt-get install ${missing[*]}"
        apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
    fi
}

STARTED_DOCKERD=
ensure_dockerd() {
    docker info >/dev/null 2>&1 && return
    log "starting dockerd (log: $WORK_DIR/dockerd.log)"
    dockerd >"$WORK_DIR/dockerd.log" 2>&1 &
    STARTED_DOCKERD=$!
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && return; sleep 1; done
    die "dockerd did not come up; see $WORK_DIR/dockerd.log"
}

compose() {
    if docker compose version >/dev/null 2>&1; then docker compose "$@"; else docker-compose "$@"; fi
}

cleanup() {
    rm -rf "$EXTRA/ca.pem" "$EXTRA/wheels"
    if [ -z "${KEEP:-}" ]; then
        docker rm -f "$CONTAINER" >/dev/null 2>&1 || true
        (cd "$REPO" && compose_env compose -p "$PROJECT" --profile scale down -v >/dev/null 2>&1) || true
        if [ -n "$STARTED_DOCKERD" ]; then kill "$STARTED_DOCKERD" 2>/dev/null || true; fi
    fi
}
trap cleanup EXIT

build_base() {
    if docker image inspect "$BASE_TAG" >/dev/null 2>&1; then
        log "base image $BASE_TAG exists (docker rmi it to rebuild)"
        return
    fi
    local rootfs=$WORK_DIR/rootfs start
    start=$(now)
    log "debootstrap bookworm into $rootfs"
    rm -rf "$rootfs"
    $NICE debootstrap --variant=minbase bookworm "$rootfs" "$MIRROR" >"$WORK_DIR/debootstrap.log" 2>&1 \
        || die "debootstrap failed; see $WORK_DIR/debootstrap.log"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | docker import - "$BASE_TAG" >/dev/null
    rm -rf "$rootfs"
    log "base image $BASE_TAG in $(since "$start") s"
}

# This machine's torch wheel and CA bundle, where the Dockerfile's build stage looks for them.
stage_build_extra() {
    local cert=${CA_BUNDLE:-$("$PYTHON" -m pip config get global.cert 2>/dev/null || true)}
    cert=${cert:-/etc/ssl/certs/ca-certificates.crt}
    [ -f "$cert" ] || die "no CA bundle at $cert (set CA_BUNDLE=...)"
    cp "$cert" "$EXTRA/ca.pem"
    mkdir -p "$EXTRA/wheels"
    # pip download shows where pip takes torch from (a wheel on this disk, or the index).
    "$PYTHON" -m pip download --no-deps --only-binary=:all: "torch==$TORCH_VERSION" -d "$EXTRA/wheels" -q \
        || die "pip download torch==$TORCH_VERSION failed"
    log "handed to the build: $(ls "$EXTRA/wheels"), CA bundle from $cert"
}

build_image() {
    local start
    start=$(now)
    log "docker build $IMAGE_TAG on $BASE_TAG (log: $WORK_DIR/build.log)"
    (cd "$REPO" && $NICE docker build --network host -f docker/Dockerfile.cpu \
        --build-arg BASE_IMAGE="$BASE_TAG" --build-arg TORCH_VERSION="$TORCH_VERSION" \
        -t "$IMAGE_TAG" .) >"$WORK_DIR/build.log" 2>&1 || { tail -30 "$WORK_DIR/build.log"; die "build failed"; }
    BUILD_S=$(since "$start")
    IMAGE_MB=$(docker image inspect -f '{{.Size}}' "$IMAGE_TAG" | awk '{ printf "%d", $1 / 1e6 }')
    log "built $IMAGE_TAG in $BUILD_S s: $IMAGE_MB MB"
    # Nothing handed in for the build may be left in the image.
    docker run --rm --entrypoint sh "$IMAGE_TAG" -c \
        'test ! -e /build-extra && test ! -e /src && ! grep -rqs "BEGIN CERTIFICATE" /opt/venv/pip.conf /etc/pip.conf' \
        || die "the image keeps build-only files"
}

build_lb_image() {
    docker image inspect "$LB_TAG" >/dev/null 2>&1 && return
    log "nginx image $LB_TAG on $BASE_TAG"
    # Debian's nginx reads conf.d/*.conf like the official image; its own default site goes.
    $NICE docker build --network host -t "$LB_TAG" - >"$WORK_DIR/lb-build.log" 2>&1 <<EOF || die "nginx image failed"
FROM $BASE_TAG
RUN apt-get update && apt-get install -y --no-install-recommends nginx curl \\
    && rm -rf /var/lib/apt/lists/* /etc/nginx/sites-enabled/default \\
    && ln -sf /dev/stdout /var/log/nginx/access.log && ln -sf /dev/stderr /var/log/nginx/error.log
CMD ["nginx", "-g", "daemon off;"]
EOF
}

# Seconds until `url` answers 200.
wait_http() {
    local url=$1 limit=$2 start
    start=$(now)
    for _ in $(seq "$limit"); do
        curl -fsS -o /dev/null "$url" 2>/dev/null && { since "$start"; return; }
        sleep 1
    done
    return 1
}

wait_healthy() {
    local container=$1 limit=$2
    for _ in $(seq "$limit"); do
        [ "$(docker inspect -f '{{.State.Health.Status}}' "$container")" = healthy ] && return
        sleep 1
    done
    docker logs --tail 30 "$container"
    die "$container is not healthy after $limit s"
}

steered_chat() {
    "$PYTHON" - "$1" <<'EOF'
import sys

from openai import OpenAI

client = OpenAI(base_url=sys.argv[1] + "/v1", api_key="unused")
reply = client.chat.completions.create(
    model=client.models.list().data[0].id,
    messages=[{"role": "user", "content": "What happens if you crack your knuckles a lot?"}],
    max_tokens=40,
    temperature=0,
    # threshold 1.0: every check fires, so the answer is backtracked and regenerated steered
    extra_body={"steering": {"mode": "fasb", "threshold": 1.0, "max_backtracks": 1, "return_scores": True}},
)
choice = reply.choices[0]
steering = choice.model_extra.get("steering") or {}
scores = steering.get("scores") or []
assert choice.message.content, "empty answer"
assert steering.get("intervened") and scores, f"not steered: {steering}"
print(f"  answer: {choice.message.content[:80]!r}...")
print(f"  steering: intervened, {len(steering['backtracks'])} backtrack(s), {len(scores)} probe scores")
EOF
}

# Run the image with the server flags given, until healthy; then a steered request. Sets SERVE_S
# (seconds until /health answers 200) and HEALTHY_S (until Docker's healthcheck says healthy).
run_single() {
    log "docker run $IMAGE_TAG ${*:-(default flags)} (host network, port $PORT)"
    docker rm -f "$CONTAINER" >/dev/null 2>&1 || true
    local start
    start=$(now)
    docker run -d --name "$CONTAINER" --network host -e FASB_PORT="$PORT" \
        ${THREADS:+-e OMP_NUM_THREADS="$THREADS"} "$IMAGE_TAG" \
        fasb-server --host 127.0.0.1 "$@" >/dev/null
    SERVE_S=$(wait_http "http://127.0.0.1:$PORT/health" 600) || { docker logs --tail 30 "$CONTAINER"; die "no /health"; }
    wait_healthy "$CONTAINER" 120
    HEALTHY_S=$(since "$start")
    log "serving after $SERVE_S s, healthcheck healthy after $HEALTHY_S s"
    steered_chat "http://127.0.0.1:$PORT"
    docker rm -f "$CONTAINER" >/dev/null
}

compose_env() {
    FASB_REPLICAS=$REPLICAS FASB_LB_IMAGE=$LB_TAG FASB_LB_PORT=$LB_PORT "$@"
}

run_scale() {
    log "compose --profile scale: $REPLICAS replicas behind nginx on port $LB_PORT"
    cd "$REPO"
    local start
    start=$(now)
    # --no-build: the image was built above, with the build-extra files this machine needs.
    compose_env compose -p "$PROJECT" --profile scale up -d --no-build --scale fasb-replica="$REPLICAS" lb \
        >"$WORK_DIR/compose.log" 2>&1 || { cat "$WORK_DIR/compose.log"; die "compose up failed"; }
    wait_http "http://127.0.0.1:$LB_PORT/health" 300 >/dev/null || die "nginx answers no /health"
    SCALE_S=$(since "$start")
    local healthy
    healthy=$(docker ps --filter "label=com.docker.compose.project=$PROJECT" \
        --filter "label=com.docker.compose.service=fasb-replica" --filter health=healthy -q | wc -l)
    [ "$healthy" = "$REPLICAS" ] || die "$healthy of $REPLICAS replicas healthy"
    log "$REPLICAS healthy replicas behind nginx after $SCALE_S s"
    steered_chat "http://127.0.0.1:$LB_PORT"
    compose_env compose -p "$PROJECT" --profile scale down -v >/dev/null 2>&1
}

TOTAL_START=$(now)
ensure_tools
ensure_dockerd
build_base
stage_build_extra
build_image
rm -rf "$EXTRA/ca.pem" "$EXTRA/wheels"
build_lb_image
run_single
PLAIN="serving after $SERVE_S s (healthy $HEALTHY_S s)"
# The compiled paths need the image's C++ toolchain: the static runner's torch.compile, the int4 kernel.
run_single --runner static --quantization int4 --max-batch-size 2 --max-model-len 1024
COMPILED="serving after $SERVE_S s (healthy $HEALTHY_S s)"
run_scale
log "all checks passed in $(since "$TOTAL_START") s: image $IMAGE_TAG $IMAGE_MB MB, built in $BUILD_S s;" \
    "default flags $PLAIN; static runner + int4 $COMPILED; $REPLICAS replicas behind nginx serving after $SCALE_S s"
