#!/usr/bin/env bash
# Builds the platform's one image (deploy/docker/Dockerfile) from this checkout.
#
#   scripts/build-image.sh [-t TAG] [--base IMAGE] [--torch-index URL] [--wheelhouse DIR] [-- DOCKER BUILD ARGS]
#
#   -t TAG             the image's tag (default esd-platform:latest)
#   --base IMAGE       the base image (default python:3.11-slim-bookworm; a CUDA runtime for GPU hosts)
#   --torch-index URL  PyTorch's wheel index (default: the CPU builds)
#   --wheelhouse DIR   build without reaching a package index: DIR is filled with wheels of every
#                      dependency by this machine's pip (PyTorch from --torch-index when given;
#                      kept, so a rebuild downloads nothing) and served to the build on a loopback port
#
# DOCKER names the docker client (default: docker).
set -euo pipefail
cd "$(dirname "$0")/.."

docker=${DOCKER:-docker}
tag=esd-platform:latest
base=""
torch_index=""
wheelhouse=""
extra=()
while [ $# -gt 0 ]; do
    case "$1" in
        -t|--tag) tag=$2; shift 2 ;;
        --base) base=$2; shift 2 ;;
        --torch-index) torch_index=$2; shift 2 ;;
        --wheelhouse) wheelhouse=$2; shift 2 ;;
        --) shift; extra=("$@"); break ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done

args=(--tag "$tag" --file deploy/docker/Dockerfile)
[ -n "$base" ] && args+=(--build-arg "BASE_IMAGE=$base")
[ -n "$torch_index" ] && args+=(--build-arg "TORCH_INDEX_URL=$torch_index")

server=""
cleanup() { [ -n "$server" ] && kill "$server" 2>/dev/null || true; }
trap cleanup EXIT

if [ -n "$wheelhouse" ]; then
    mkdir -p "$wheelhouse"
    python=${PYTHON:-python3}
    requirements=$(mktemp)
    "$python" -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['gpu']))" > "$requirements"
    torch_spec=$(sed -n 's/^ARG TORCH_SPEC="\(.*\)"$/\1/p' deploy/docker/Dockerfile)
    # wheels of everything (sdists built here); what the folder has already is not fetched again
    torch_from=()
    [ -n "$torch_index" ] && torch_from=(--extra-index-url "$torch_index")
    "$python" -m pip wheel --quiet --wheel-dir "$wheelhouse" --find-links "$wheelhouse" "${torch_from[@]}" \
        "$torch_spec" "setuptools>=68" -r "$requirements"
    rm -f "$requirements"
    # a fixed port when free: the URL is a build argument, and an unchanged one keeps the
    # layers cached
    port=$("$python" -c "
import socket
s = socket.socket()
try:
    s.bind(('127.0.0.1', ${ESD_WHEELHOUSE_PORT:-47411}))
except OSError:
    s.bind(('127.0.0.1', 0))
print(s.getsockname()[1])")
    "$python" -m http.server --bind 127.0.0.1 --directory "$wheelhouse" "$port" >/dev/null 2>&1 &
    server=$!
    for _ in $(seq 50); do
        "$python" -c "import socket; socket.create_connection(('127.0.0.1', $port), 1)" 2>/dev/null && break
        sleep 0.1
    done
    # the build reaches the folder on this host's loopback
    args+=(--network host --build-arg "ESD_PIP_OPTIONS=--no-index --find-links http://127.0.0.1:$port/")
fi

"$docker" build "${args[@]}" "${extra[@]}" .
