#!/usr/bin/env bash
# Installs the Debian tools Helix's tests use, when they are missing; `make test` runs it first.
#
#   - the shell linter, Debian package `shellcheck` (tests/test_deploy.py lints every deploy/ script);
#   - promtool, from Debian's `prometheus` package (checks MonitorS's /metrics exposition);
#   - systemd-analyze, Debian package `systemd`: only reported, never installed (it is the init system).
#
# Only as root with apt-get; otherwise, or if apt cannot reach its mirror, it prints ONE line naming
# what is missing and which tests will skip, and exits 0: a missing tool never fails `make test`,
# its tests skip (or fall back) with a reason. When everything is present it only runs `command -v`.
#
# promtool: the `prometheus` package is a 19 MB download that installs and enables a Prometheus
# server (and a dozen JavaScript packages). A test run needs neither, so only the promtool binary is
# taken from the package (`apt-get download`, then `dpkg-deb`) and put in /usr/local/bin.
# Remove it with `rm /usr/local/bin/promtool`.
#
# Usage: bash deploy/sysdeps.sh [--check]   (--check: report only, install nothing)
set -u

PROMTOOL_DEST=/usr/local/bin/promtool
declare -A SKIPS=(
    [shellcheck]="the shellcheck tests in tests/test_deploy.py skip"
    [promtool]="the metrics-format tests fall back to prometheus_client's parser"
    [systemd-analyze]="the unit verification tests in tests/test_deploy.py skip (it comes with Debian's systemd package)"
)

missing() {
    local tool
    for tool in shellcheck promtool systemd-analyze; do
        command -v "$tool" >/dev/null 2>&1 || printf '%s\n' "$tool"
    done
}

report() {  # $1: why; the rest: the missing tools. One line, always.
    local why=$1 tool line=""
    shift
    for tool in "$@"; do
        line+="${line:+; }$tool missing, ${SKIPS[$tool]}"
    done
    echo "helix sysdeps: $line. $why."
}

mapfile -t MISSING < <(missing)
[ "${#MISSING[@]}" -eq 0 ] && exit 0

if [ "${1:-}" = "--check" ]; then
    report "To install: sudo bash deploy/sysdeps.sh" "${MISSING[@]}"
    exit 0
fi
if [ "$EUID" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    report "To install, run as root on Debian: sudo bash deploy/sysdeps.sh" "${MISSING[@]}"
    exit 0
fi

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
LOG=$WORK/apt.log
export DEBIAN_FRONTEND=noninteractive
# Short network timeouts and a bounded wait for the dpkg lock (other test runs may hold it).
APT=(timeout 180 apt-get -q -y -o Acquire::Retries=1 -o Acquire::http::Timeout=20
     -o Acquire::https::Timeout=20 -o DPkg::Lock::Timeout=120 -o APT::Sandbox::User=root)
UPDATED=0

# Run an apt command; if it fails and the package lists were not refreshed yet, refresh and retry once.
apt_retry() {
    "${APT[@]}" "$@" >>"$LOG" 2>&1 && return 0
    [ "$UPDATED" -eq 1 ] && return 1
    UPDATED=1
    "${APT[@]}" update >>"$LOG" 2>&1 || return 1
    "${APT[@]}" "$@" >>"$LOG" 2>&1
}

install_promtool() {
    local deb status
    # apt-get download saves into the current directory; no subshell, so a refresh is not repeated.
    cd "$WORK" || return 1
    apt_retry download prometheus
    status=$?
    cd - >/dev/null || return 1
    [ "$status" -eq 0 ] || return 1
    deb=$(find "$WORK" -maxdepth 1 -name 'prometheus_*.deb' -print -quit)
    [ -n "$deb" ] || return 1
    dpkg-deb --fsys-tarfile "$deb" | tar -xOf - ./usr/bin/promtool >"$WORK/promtool" || return 1
    chmod 0755 "$WORK/promtool"
    "$WORK/promtool" --version >/dev/null 2>&1 || return 1
    mv "$WORK/promtool" "$PROMTOOL_DEST"
}

INSTALLED=()
FAILED=()
NOT_HERE=()
for tool in "${MISSING[@]}"; do
    case $tool in
        shellcheck) apt_retry install --no-install-recommends shellcheck ;;
        promtool) install_promtool ;;
        *) NOT_HERE+=("$tool"); continue ;;  # systemd-analyze: never installed from here
    esac
    if command -v "$tool" >/dev/null 2>&1; then INSTALLED+=("$tool"); else FAILED+=("$tool"); fi
done

if [ "$((${#FAILED[@]} + ${#NOT_HERE[@]}))" -gt 0 ]; then
    why="apt-get could not install it"
    error=$(grep -sE '^(E|Err):' "$LOG" | tail -n 1 | cut -c1-160)
    [ -n "$error" ] && why="$why: $error"
    [ "${#FAILED[@]}" -eq 0 ] && why="Install the Debian package systemd to verify units"
    [ "${#INSTALLED[@]}" -gt 0 ] && why="installed ${INSTALLED[*]}; $why"
    report "$why" "${FAILED[@]}" "${NOT_HERE[@]}"
else
    echo "helix sysdeps: installed ${INSTALLED[*]}"
fi
exit 0
