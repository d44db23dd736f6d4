#!/usr/bin/env bash
# Bake a Helix machine from a stock Debian (12+) or Ubuntu (22.04+) image.
#
#   sudo bash deploy/ami/bake.sh [--role app|manager] [--source DIR|TARBALL] [--sample-app] [--no-apt]
#
# --role app (default): an app-instance image. Installs Python, the project in /opt/helix with its
#     own venv (/opt/helix/.venv, from requirements.txt), the system user `helix`, and
#     helix-monitor-c.service, enabled. Nothing is configured in the image: at boot cloud-init
#     writes /etc/helix/helix.env from the user data ControllerASG renders and restarts the agent
#     (until that file exists the unit is skipped, not failed).
# --role manager: the same install with helix-monitor-s.service and helix-controller-asg.service,
#     enabled but not started: write /etc/helix/helix.env first (see deploy/helix.env.example).
# --sample-app: also install and enable helix-sample-app.service (the demo app on port 8080).
# --source: the project to install, a directory or a .tar.gz; default: the checkout holding
#     this script. As a Packer shell provisioner the script is uploaded alone, so pass the tarball
#     the template uploads (see helix-app.pkr.hcl).
# --no-apt: install no system packages (they are already there).
#
# Safe to run again: the new tree replaces /opt/helix only once its venv is built.
set -euo pipefail

PREFIX=/opt/helix
ETC=/etc/helix
UNIT_DIR=/etc/systemd/system
HELIX_USER=helix
STATE_DIR=/var/lib/helix

ROLE=app
SOURCE=""
SAMPLE_APP=0
USE_APT=1

say() { echo "helix bake: $*"; }
die() { echo "helix bake: error: $*" >&2; exit 1; }

usage() {  # the comment block at the top of this file
    awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"
    exit "${1:-0}"
}

while [ $# -gt 0 ]; do
    case $1 in
        --role) [ $# -ge 2 ] || die "--role: expected app or manager"; ROLE=$2; shift 2 ;;
        --role=*) ROLE=${1#--role=}; shift ;;
        --source) [ $# -ge 2 ] || die "--source: expected a directory or a .tar.gz"; SOURCE=$2; shift 2 ;;
        --source=*) SOURCE=${1#--source=}; shift ;;
        --sample-app) SAMPLE_APP=1; shift ;;
        --no-apt) USE_APT=0; shift ;;
        -h|--help) usage 0 ;;
        *) die "$1: expected one of --role, --source, --sample-app, --no-apt, --help" ;;
    esac
done

case $ROLE in
    app) UNITS=(helix-monitor-c.service) ;;
    manager) UNITS=(helix-monitor-s.service helix-controller-asg.service) ;;
    *) die "--role=$ROLE: expected app or manager" ;;
esac
[ "$EUID" -eq 0 ] || die "run as root (sudo bash $0 ...)"

WORK=$(mktemp -d)
cleanup() { rm -rf "$WORK"; }
trap cleanup EXIT

# --- the project ----------------------------------------------------------------------------------
if [ -z "$SOURCE" ]; then
    SOURCE=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
fi
if [ -f "$SOURCE" ]; then
    mkdir "$WORK/src"
    tar -xzf "$SOURCE" -C "$WORK/src" || die "--source=$SOURCE: expected a readable .tar.gz"
    # Accept both a flat archive and one with a single top-level folder (git archive --prefix=...).
    mapfile -t top < <(find "$WORK/src" -mindepth 1 -maxdepth 1)
    if [ "${#top[@]}" -eq 1 ] && [ -d "${top[0]}" ]; then SRC_DIR=${top[0]}; else SRC_DIR=$WORK/src; fi
elif [ -d "$SOURCE" ]; then
    SRC_DIR=$(cd "$SOURCE" && pwd)
else
    die "--source=$SOURCE: expected a directory or a .tar.gz"
fi
for need in requirements.txt monitor_c shared deploy/systemd; do
    [ -e "$SRC_DIR/$need" ] || die "--source=$SOURCE: expected a Helix project (no $need in it)"
done

# --- system packages ------------------------------------------------------------------------------
python_ok() { "$1" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; }

if [ "$USE_APT" -eq 1 ]; then
    command -v apt-get >/dev/null || die "apt-get not found: expected Debian or Ubuntu (or pass --no-apt)"
    export DEBIAN_FRONTEND=noninteractive
    say "installing Python and the venv module"
    apt-get update -q
    apt-get install -y -q --no-install-recommends python3 python3-venv ca-certificates
    # Ubuntu 22.04's python3 is 3.10; its python3.11 package is the one Helix needs.
    if ! python_ok python3 && ! python_ok python3.11; then
        apt-get install -y -q --no-install-recommends python3.11 python3.11-venv
    fi
fi
# The distribution's interpreter first: a venv made from one under /root (pyenv, say) would not
# run as the helix user.
PYTHON=""
for candidate in /usr/bin/python3 /usr/bin/python3.13 /usr/bin/python3.12 /usr/bin/python3.11 \
                 python3 python3.13 python3.12 python3.11; do
    if command -v "$candidate" >/dev/null && python_ok "$candidate"; then PYTHON=$(command -v "$candidate"); break; fi
done
command -v systemctl >/dev/null || die "systemctl not found: expected a systemd-based Debian or Ubuntu"
[ -n "$PYTHON" ] || die "no Python 3.11 or newer with the venv module (Debian: apt-get install python3 python3-venv)"
if [ "$ROLE" = app ] && ! command -v cloud-init >/dev/null; then
    say "warning: cloud-init is not installed; instances will not get /etc/helix/helix.env from their user data"
fi

# --- the user -------------------------------------------------------------------------------------
if ! id "$HELIX_USER" >/dev/null 2>&1; then
    say "creating system user $HELIX_USER"
    useradd --system --user-group --home-dir "$STATE_DIR" --no-create-home --shell /usr/sbin/nologin "$HELIX_USER"
fi

# --- /opt/helix and its venv ----------------------------------------------------------------------
# Built beside the live tree and swapped in whole. A venv cannot be moved (its scripts name their
# own path), so the old tree steps aside, the venv is built in place, and on failure the old one
# comes back.
say "installing $SRC_DIR into $PREFIX"
rm -rf "$PREFIX.new" "$PREFIX.previous"
mkdir -p "$PREFIX.new"
tar -C "$SRC_DIR" \
    --exclude=./.git --exclude=./.venv --exclude=__pycache__ --exclude=./.pytest_cache \
    --exclude=./.hypothesis --exclude=./.helix-state --exclude=./bench/out --exclude=./demo-out \
    --exclude=./.env --exclude='*.egg-info' -cf - . | tar -C "$PREFIX.new" -xf -
chown -R root:root "$PREFIX.new"
chmod -R u=rwX,go=rX "$PREFIX.new"

[ -e "$PREFIX" ] && mv "$PREFIX" "$PREFIX.previous"
mv "$PREFIX.new" "$PREFIX"
restore() {
    rm -rf "$PREFIX"
    if [ -e "$PREFIX.previous" ]; then mv "$PREFIX.previous" "$PREFIX"; fi
}
build_venv() {
    "$PYTHON" -m venv "$PREFIX/.venv" &&
    "$PREFIX/.venv/bin/python" -m pip install --quiet --no-cache-dir --disable-pip-version-check \
        -r "$PREFIX/requirements.txt" &&
    # The units' sandbox makes /opt/helix read-only: compile now so imports never try to write.
    "$PREFIX/.venv/bin/python" -m compileall -q -j 0 -x '/\.venv/' "$PREFIX" >/dev/null &&
    # As the units will run it: the helix user must be able to start the venv's interpreter.
    runuser -u "$HELIX_USER" -- env PYTHONPATH="$PREFIX" PYTHONDONTWRITEBYTECODE=1 \
        "$PREFIX/.venv/bin/python" -c 'import grpc, psutil, numpy, dotenv, monitor_c, monitor_s, controller_asg, shared.config'
}
say "building $PREFIX/.venv from requirements.txt"
if ! (cd "$PREFIX" && build_venv); then
    restore
    die "could not build the venv in $PREFIX/.venv (the previous install, if any, is back in place)"
fi
rm -rf "$PREFIX.previous"

# --- settings and units ---------------------------------------------------------------------------
install -d -m 0750 -o root -g "$HELIX_USER" "$ETC"
install -m 0640 -o root -g "$HELIX_USER" "$PREFIX/deploy/helix.env.example" "$ETC/helix.env.example"
UNIT_FILES=()
for unit in "${UNITS[@]}"; do UNIT_FILES+=("$PREFIX/deploy/systemd/$unit"); done
if [ "$SAMPLE_APP" -eq 1 ]; then
    UNITS+=(helix-sample-app.service)
    UNIT_FILES+=("$PREFIX/deploy/ami/helix-sample-app.service")
fi
for file in "${UNIT_FILES[@]}"; do
    install -m 0644 -o root -g root "$file" "$UNIT_DIR/$(basename "$file")"
done
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
fi
# `systemctl enable` only makes symlinks, so it works in a chroot or an image build too.
systemctl enable "${UNITS[@]}"

if [ "$USE_APT" -eq 1 ] && [ "$ROLE" = app ]; then
    apt-get clean  # a smaller image
    rm -rf /var/lib/apt/lists/*
fi

say "done: $PREFIX ($("$PREFIX/.venv/bin/python" -V 2>&1)), units enabled: ${UNITS[*]}"
if [ "$ROLE" = manager ] && [ ! -e "$ETC/helix.env" ]; then
    say "next: write $ETC/helix.env (root:$HELIX_USER 0640; see $ETC/helix.env.example), then"
    say "      systemctl start ${UNITS[*]}"
fi
