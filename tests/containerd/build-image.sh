#!/usr/bin/env bash
# Builds a busybox OCI image (from Debian's busybox-static) as an OCI layout tarball that
# `ctr image import` takes; no registry needed. Deterministic: same input, same digests.
#   usage: build-image.sh OUT.tar [IMAGE_NAME]
# VMBOX_IMAGE_CMD: the image's Cmd as a JSON array (default ["sh"]); the CRI tests' pause
# image is this busybox with a Cmd that sleeps for ever.
# For containerd's CRI integration tests' volume images (space-separated lists):
#   VMBOX_IMAGE_FILES="dir/file=content ..."  files added to the rootfs (printf %b escapes)
#   VMBOX_IMAGE_OWNER="path=uid:gid ..."      owners set on them
#   VMBOX_IMAGE_VOLUMES="/dir ..."            the image config's Volumes
#   VMBOX_IMAGE_ADD=DIR                       a tree copied into the rootfs
set -euo pipefail
cmd=${VMBOX_IMAGE_CMD:-'["sh"]'}
# Absolute before anything runs with -C or changes directory.
out=$(realpath -m -- "${1:?usage: build-image.sh OUT.tar [IMAGE_NAME]}")
name=${2:-docker.io/vmbox/busybox:latest}
busybox=$(command -v busybox || true)
[ -x /bin/busybox ] && busybox=/bin/busybox
[ -n "$busybox" ] || { echo "build-image: busybox not found: apt-get install busybox-static" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/rootfs
mkdir -p "$root"/{bin,etc,proc,sys,dev,tmp,root,data}
cp "$busybox" "$root/bin/busybox"
for a in $("$busybox" --list); do [ -e "$root/bin/$a" ] || ln -s busybox "$root/bin/$a"; done
# The users and groups of Docker's busybox image (containerd's CRI tests name them).
printf '%s\n' "root:x:0:0:root:/root:/bin/sh" "daemon:x:1:1:daemon:/usr/sbin:/bin/false" \
  "bin:x:2:2:bin:/bin:/bin/false" "sys:x:3:3:sys:/dev:/bin/false" \
  "nobody:x:65534:65534:nobody:/home:/bin/false" > "$root/etc/passwd"
printf '%s\n' "root:x:0:" "daemon:x:1:" "bin:x:2:" "sys:x:3:" "wheel:x:10:root" \
  "nogroup:x:65534:" > "$root/etc/group"
chmod 1777 "$root/tmp"
if [ -n "${VMBOX_IMAGE_ADD:-}" ]; then cp -a "$VMBOX_IMAGE_ADD"/. "$root"/; fi
for f in ${VMBOX_IMAGE_FILES:-}; do
  mkdir -p "$root/$(dirname "${f%%=*}")"
  printf '%b' "${f#*=}" > "$root/${f%%=*}"
done
chown -R 0:0 "$root"
for o in ${VMBOX_IMAGE_OWNER:-}; do chown "${o#*=}" "$root/${o%%=*}"; done
volumes=""
for v in ${VMBOX_IMAGE_VOLUMES:-}; do volumes="$volumes${volumes:+,}\"$v\":{}"; done
vol_json=""
[ -z "$volumes" ] || vol_json=",\"Volumes\":{$volumes}"
tar --sort=name --mtime=@0 --numeric-owner -C "$root" -cf "$work/layer.tar" .
diff_id=$(sha256sum "$work/layer.tar" | cut -d' ' -f1)
gzip -n -9 < "$work/layer.tar" > "$work/layer.tar.gz"
layer=$(sha256sum "$work/layer.tar.gz" | cut -d' ' -f1)
layer_size=$(stat -c %s "$work/layer.tar.gz")
blobs=$work/oci/blobs/sha256
mkdir -p "$blobs"
mv "$work/layer.tar.gz" "$blobs/$layer"
cat > "$work/config.json" <<JSON
{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"Cmd":$cmd,"WorkingDir":"/"$vol_json},"rootfs":{"type":"layers","diff_ids":["sha256:$diff_id"]}}
JSON
config=$(sha256sum "$work/config.json" | cut -d' ' -f1)
config_size=$(stat -c %s "$work/config.json")
mv "$work/config.json" "$blobs/$config"
cat > "$work/manifest.json" <<JSON
{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:$config","size":$config_size},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:$layer","size":$layer_size}]}
JSON
manifest=$(sha256sum "$work/manifest.json" | cut -d' ' -f1)
manifest_size=$(stat -c %s "$work/manifest.json")
mv "$work/manifest.json" "$blobs/$manifest"
echo '{"imageLayoutVersion":"1.0.0"}' > "$work/oci/oci-layout"
cat > "$work/oci/index.json" <<JSON
{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:$manifest","size":$manifest_size,"annotations":{"io.containerd.image.name":"$name","org.opencontainers.image.ref.name":"latest"}}]}
JSON
tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$work/oci" -cf "$out" .
echo "build-image: $out ($name)"
