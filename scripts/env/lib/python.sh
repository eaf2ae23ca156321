# shellcheck shell=bash
# The tests' Python packages (scripts/env/python/requirements.txt), installed
# with pip into a venv in the cache, once per version of the requirements:
#   $WALCAST_CACHE_DIR/python-<sha256 prefix>/   (marker .walcast-complete)
# Sourced by scripts/dev, never executed.

WALCAST_PY_REQUIREMENTS="$WALCAST_ENV_DIR/python/requirements.txt"

# prints the venv's python, installing the venv first when needed
ensure_python_venv() {
  local sum venv
  sum="$(sha256sum "$WALCAST_PY_REQUIREMENTS" | cut -c1-16)"
  venv="$WALCAST_CACHE_DIR/python-$sum"
  if [[ ! -f "$venv/.walcast-complete" ]]; then
    command -v python3 >/dev/null || die "python3 is needed (Debian: apt-get install python3 python3-venv)"
    mkdir -p "$WALCAST_CACHE_DIR"
    # one installer at a time (parallel test runs share the cache)
    exec 8>"$WALCAST_CACHE_DIR/.python.lock"
    flock 8
    if [[ ! -f "$venv/.walcast-complete" ]]; then
      info "installing the tests' Python packages into $venv (pip)"
      rm -rf "$venv"
      python3 -m venv "$venv" >&2 || die "python3 -m venv failed (Debian: apt-get install python3-venv)"
      "$venv/bin/python" -m pip install -q --disable-pip-version-check \
        -r "$WALCAST_PY_REQUIREMENTS" >&2 || die "pip could not install $WALCAST_PY_REQUIREMENTS"
      echo "$sum" >"$venv/.walcast-complete"
    fi
    exec 8>&-
  fi
  echo "$venv/bin/python"
}
