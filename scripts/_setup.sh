# Shared set-up for scripts/demo and scripts/test: system packages and .venv.
# Sourced, not run. Installs only what is missing; safe to run again.

apt_install() {
    # apt_install PKG... : install Debian packages (as root, or through sudo).
    local sudo=""
    if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
    if [ -z "${_APT_UPDATED:-}" ]; then
        $sudo apt-get update -qq
        _APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

ensure_venv() {
    # ensure_venv EXTRAS : create .venv if needed and install the package with EXTRAS.
    local extras="$1"
    if [ ! -x .venv/bin/python ]; then
        if ! python3 -m venv .venv 2>/dev/null; then
            rm -rf .venv
            apt_install python3 python3-venv python3-pip
            python3 -m venv .venv
        fi
    fi
    local stamp=".venv/.installed-$extras"
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
        .venv/bin/python -m pip install -q -e ".[$extras]" 2>&1 | grep -v "^WARNING: Location" || true
        .venv/bin/python -c "import ratelimit" && touch "$stamp"
    fi
}
