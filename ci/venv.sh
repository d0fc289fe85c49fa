#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Make the Python venv DIR the CI scripts install their PyPI tools into (schemathesis,
# Pillow). Debian's python3 needs its python3-venv package for that; installed when missing.
set -euo pipefail
dir="$1"
[ -x "$dir/bin/pip" ] && exit 0
if ! python3 -m venv "$dir" 2>/dev/null; then
    [ "$(id -u)" -eq 0 ] || { echo "error: python3 -m venv failed (apt-get install python3-venv)" >&2; exit 1; }
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
    rm -rf "$dir"
    python3 -m venv "$dir"
fi
