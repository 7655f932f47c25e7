#!/usr/bin/env bash
# Installs what the native runtime's build needs on a fresh Debian 12 (bookworm) machine, as root:
#   runtime/native/install-deps.sh [PREFIX]
# Debian's compiler, cmake and libraries (PCRE2, libjpeg-turbo, libpng, OpenSSL, nlohmann JSON), and ONNX Runtime's
# C headers, which no PyPI package ships: they come from Debian 13 (trixie)'s libonnxruntime-dev, unpacked
# (not installed) into PREFIX (default: .deps/onnxruntime in the repository). The shared library the build
# links is the onnxruntime wheel's (the C API is versioned and backward compatible: 1.21 headers work
# with a newer library). Nothing of trixie is installed system-wide.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
prefix="${1:-$root/.deps/onnxruntime}"
export DEBIAN_FRONTEND=noninteractive

apt-get update -q
apt-get install -y -q --no-install-recommends build-essential cmake pkg-config \
    libpcre2-dev libjpeg62-turbo-dev libpng-dev libssl-dev nlohmann-json3-dev

if [ -f "$prefix/include/onnxruntime_c_api.h" ]; then
    echo "ONNX Runtime headers already in $prefix/include"
    exit 0
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/debs"
# The machine's own Debian mirror (the first deb URI its apt sources name), with the trixie suite.
mirror="$(grep -hoE '^(URIs:|deb) +[a-z]+://[^ ]+/debian/?( |$)' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list \
          2>/dev/null | head -1 | awk '{print $2}' || true)"
[ -n "$mirror" ] || { echo "install-deps: no Debian mirror found in /etc/apt sources" >&2; exit 2; }
echo "deb $mirror trixie main" > "$work/sources.list"
apt_private=(-o Dir::Etc::SourceList="$work/sources.list" -o Dir::Etc::SourceParts=- -o Dir::State::Lists="$work/lists")
apt-get "${apt_private[@]}" update -q
(cd "$work/debs" && apt-get "${apt_private[@]}" download libonnxruntime-dev)
dpkg -x "$work"/debs/libonnxruntime-dev_*.deb "$work/extract"
mkdir -p "$prefix/include"
cp "$(dirname "$(find "$work/extract" -name onnxruntime_c_api.h | head -1)")"/*.h "$prefix/include/"
echo "ONNX Runtime headers in $prefix/include"
