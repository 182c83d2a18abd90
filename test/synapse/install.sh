#!/usr/bin/env bash
# Installs Synapse from PyPI into .cache/synapse-venv for the end-to-end tests that need a real
# homeserver (test/helpers/synapse.ts). Idempotent: when the pinned version is already installed it
# returns at once. Installs Debian's python3-venv first when the machine's python3 cannot make a
# virtualenv (a fresh Debian has python3 without ensurepip).
set -euo pipefail
cd "$(dirname "$0")/../.."

# Pinned so that a Synapse release cannot change the tests' results between two CI runs; the
# experimental flags that test/helpers/synapse.ts sets are checked against this version.
SYNAPSE_VERSION="1.163.2"
venv=".cache/synapse-venv"
stamp="$venv/.tribridge-synapse-version"

# The stamp is written last, after a complete install; the venv's python must still run (a venv
# breaks when the python it was made from is removed).
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$SYNAPSE_VERSION" ] && "$venv/bin/python" -c "" 2>/dev/null; then
  echo "Synapse $SYNAPSE_VERSION already in $venv"
  exit 0
fi

python="${PYTHON:-python3}"
command -v "$python" >/dev/null 2>&1 || {
  echo "installing python3 from Debian"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3
  python=python3
}

# Probe in a scratch folder: on Debian without python3-venv, `python3 -m venv` fails at ensurepip
# and leaves a half-made virtualenv behind.
probe="$(mktemp -d)"
trap 'rm -rf "$probe"' EXIT
if ! "$python" -m venv "$probe/venv" >/dev/null 2>&1; then
  echo "installing python3-venv from Debian"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
fi

rm -rf "$venv"
mkdir -p .cache
"$python" -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check --no-input "matrix-synapse==$SYNAPSE_VERSION"
"$venv/bin/python" -c "import synapse; print('Synapse', synapse.__version__, 'installed in $venv')"
echo "$SYNAPSE_VERSION" >"$stamp"
