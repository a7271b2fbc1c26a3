#!/usr/bin/env bash
# Installs what vmbox needs to build, run and test on Debian 12 (as root). Idempotent:
# a second run only checks.
set -euo pipefail

apt_pkgs=(
  containerd runc                      # the container manager vmbox plugs into; runc for comparisons
  qemu-system-x86                      # the VMM
  linux-source-6.1 flex bison bc libelf-dev cpio   # the guest kernel
  libseccomp-dev libcap-ng-dev pkg-config          # static agent (libseccomp.a) and virtiofsd
  busybox-static                       # test images and rootfs
  protobuf-compiler                    # the CRI test client's protos (k8s-cri)
  containernetworking-plugins iproute2 # CNI for the CRI tests' pods (in a test netns)
)
missing=()
for p in "${apt_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "deps: apt-get install ${missing[*]}"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# vhost-user daemons from crates.io, pinned, into /usr/local/bin (on containerd's PATH).
cargo_bin() { # name version
  if ! /usr/local/bin/"$1" --version 2>/dev/null | grep -q "$2"; then
    echo "deps: cargo install $1@$2"
    cargo install --locked --quiet --root /usr/local "$1@$2"
  fi
}
cargo_bin virtiofsd 1.14.0
cargo_bin vhost-device-vsock 0.3.0
cargo_bin cargo-fuzz 0.12.0               # make fuzz (docs/security.md)

rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt
echo "deps: ok"
