#!/usr/bin/env bash
# Builds the vmbox guest kernel from Debian's linux-source-6.1 and the fragment
# guest/kernel.config, into a cache outside the repository keyed on both, so a second run
# only copies the cached file. The output is the uncompressed vmlinux (ELF with a PVH entry
# note, symbols stripped): QEMU enters it directly, with no self-decompression in the guest.
#   usage: guest/build-kernel.sh OUT_VMLINUX
# Env: VMBOX_CACHE (default /var/cache/vmbox), JOBS (default nproc).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# Every path is made absolute here, before the script changes directory (a relative OUT
# was once installed under / on a cache miss).
out=$(realpath -m -- "${1:?usage: build-kernel.sh OUT_VMLINUX}")
cache=$(realpath -m -- "${VMBOX_CACHE:-/var/cache/vmbox}")
src_tar=/usr/src/linux-source-6.1.tar.xz
[ -f "$src_tar" ] || { echo "build-kernel: $src_tar missing: apt-get install linux-source-6.1" >&2; exit 1; }
src_ver=$(dpkg-query -W -f='${Version}' linux-source-6.1 2>/dev/null || stat -c %Y "$src_tar")
# Built for size (tinyconfig's -Os), but with memset/memcpy as calls rather than inline
# `rep stosb`/`rep movsb`: under TCG every iteration of a `rep` string instruction is a
# translated block of its own, so -Os's inline byte loops made freeing the initramfs and
# the init sections (8 MB poisoned byte by byte) alone take about 180 ms of each boot. The
# called functions use qword or vector loops on the TCG CPU (no ERMS, see TCG_CPU in
# hypervisor/src/qemu/cmdline.rs) and `rep movsb` where the host CPU is fast at it (KVM).
kcflags="-mstringop-strategy=libcall"
key=$( (echo "$src_ver"; echo "$kcflags"; cat "$here/kernel.config") | sha256sum | cut -c1-16)
cached="$cache/kernel-$key/vmlinux"
if [ -f "$cached" ]; then
  install -D -m 0644 "$cached" "$out"
  echo "build-kernel: cached $cached"
  exit 0
fi
work="$cache/kernel-$key/build"
rm -rf "$work"; mkdir -p "$work"
echo "build-kernel: unpacking $src_tar into $work"
tar -C "$work" -xJf "$src_tar"
ksrc=$(echo "$work"/linux-source-6.1)
cd "$ksrc"
make -s tinyconfig
scripts/kconfig/merge_config.sh -m .config "$here/kernel.config" >/dev/null
make -s olddefconfig
# Every option the fragment sets (=y) or unsets (=n) must have survived olddefconfig.
missing=0
while IFS= read -r line; do
  case "$line" in
    CONFIG_*=y) grep -qx "$line" .config || { echo "build-kernel: $line did not stick after olddefconfig" >&2; missing=1; } ;;
    CONFIG_*=n) ! grep -qx "${line%=n}=y" .config || { echo "build-kernel: $line did not stick after olddefconfig (something selects it)" >&2; missing=1; } ;;
  esac
done < "$here/kernel.config"
[ "$missing" = 0 ] || exit 1
echo "build-kernel: building vmlinux with ${JOBS:-$(nproc)} jobs"
make -s -j"${JOBS:-$(nproc)}" KCFLAGS="$kcflags" vmlinux
mkdir -p "$(dirname "$cached")"
# Symbols are of no use to QEMU or the guest; the PVH note (an ELF note) stays.
objcopy --strip-all vmlinux "$cached.tmp"
readelf -n "$cached.tmp" | grep -q 'Xen.*0x00000012' || { echo "build-kernel: vmlinux has no PVH entry note (CONFIG_PVH)" >&2; exit 1; }
mv "$cached.tmp" "$cached"
cp .config "$cache/kernel-$key/config"
cd /; rm -rf "$work"
install -D -m 0644 "$cached" "$out"
echo "build-kernel: built $cached"
