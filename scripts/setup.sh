#!/usr/bin/env bash
# Everything bitfx needs on a fresh Debian machine (run as root, or with sudo available).
# Idempotent: a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != "0" ] && command -v sudo >/dev/null; then SUDO=sudo; fi

# The host C++ compiler (inductor's fused glue, bitfx's C++ kernel ops), cross compilers and emulator for ARM
# (bitfx export), llvm-mca, Graphviz for `bitfx diff`.
APT_PACKAGES="g++ g++-aarch64-linux-gnu qemu-user clang lld llvm graphviz"
missing=""
for p in $APT_PACKAGES; do
  dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
done
if [ -n "$missing" ]; then
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq $missing >/dev/null
fi

PY=${PYTHON:-python3}
# Pin torch first: a bare `torch` requirement would pull the multi-GB CUDA build.
$PY -m pip install -q --disable-pip-version-check "torch==2.13.0"
$PY -m pip install -q --disable-pip-version-check -e ".[test]"
