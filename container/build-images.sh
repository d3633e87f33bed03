#!/usr/bin/env bash
# Build the team stack's images: siamese-recognizer (the Dockerfile), siamese-postgres and siamese-nginx.
#
#   container/build-images.sh             # on the public bases (python:3.11-slim-bookworm, debian:bookworm-slim)
#   BASE_IMAGE=localhost/siamese-base:bookworm container/build-images.sh     # offline: on container/base-image.sh's
#
# ENGINE=podman|docker (default: podman, else docker); PIP_CERT=/path/ca.pem hands pip a CA bundle as a build
# secret (behind a TLS-intercepting proxy); TAG names the siamese-recognizer tag (default latest).
set -euo pipefail
cd "$(dirname "$0")/.."
engine=${ENGINE:-$(command -v podman || command -v docker)}
tag=${TAG:-latest}
args=()
[ -n "${BASE_IMAGE:-}" ] && args+=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
[ "$(basename "$engine")" = podman ] && args+=(--format docker)  # keeps HEALTHCHECK (OCI images drop it)
secret=()
[ -n "${PIP_CERT:-}" ] && secret+=(--secret "id=pip_cert,src=$PIP_CERT")
if [ "${BASE_IMAGE:-}" = localhost/siamese-base:bookworm ] && ! "$engine" image exists "$BASE_IMAGE" 2>/dev/null \
   && ! "$engine" image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    container/base-image.sh "$BASE_IMAGE"
fi
build() {
    local started=$SECONDS
    "$engine" build "${args[@]}" "$@"
    echo "build-images.sh: built ${*: -2:1} in $((SECONDS - started)) s"
}
# PostgreSQL and nginx build beside the recognizer (each build waits on downloads much of its time); their output
# is shown when they end.
logs=$(mktemp -d)
trap 'rm -rf "$logs"; kill $(jobs -p) 2>/dev/null || true' EXIT
build -f container/postgres.Dockerfile -t localhost/siamese-postgres:15 container > "$logs/postgres" 2>&1 &
postgres=$!
build -f container/nginx.Dockerfile -t localhost/siamese-nginx:bookworm container > "$logs/nginx" 2>&1 &
nginx=$!
build "${secret[@]}" -t "localhost/siamese-recognizer:$tag" .
failed=0
wait "$postgres" || failed=1
cat "$logs/postgres"
wait "$nginx" || failed=1
cat "$logs/nginx"
[ "$failed" = 0 ] || { echo "build-images.sh: a build failed (its output is above)" >&2; exit 1; }
"$engine" image ls --filter reference='localhost/siamese-*'
