#!/usr/bin/env bash
# Runs containerd 1.6.20's own CRI integration tests (integration/ of Debian's containerd
# source package, the version Debian 12 ships) against vmbox as the CRI runtime handler,
# offline: the source and the Go libraries come from Debian's archive (GOPATH build, as
# Debian's own autopkgtest builds them), the images are built locally.
#
#   tests/cri-integration/run.sh [TEST_REGEX]     (root; `make cri-integration`)
#
# Prints one line per test and a summary; the full log is $out/tests.log. Needs vmbox
# built (target/release) and its guest (build/guest). Cached in $VMBOX_CACHE (default
# /var/cache/vmbox)/cri-integration: source, Go packages, test binary.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
cache=${VMBOX_CACHE:-/var/cache/vmbox}/cri-integration
out=${VMBOX_CRI_IT_DIR:-/run/vmbox-cri-it}
netns=vmbox-cri-it
ctrd_name=vmbox-it-ctrd   # the process name TestContainerdRestart pkills (-containerd-bin)
mkdir -p "$cache"

# The tests that go through the runtime handler (all but the runc-fp failpoint ones,
# TestImageLoad, which needs docker, and TestFailFastWhenConnectShim, which is local).
default_tests='^(TestContainerRestart|TestFailedContainerRestart|TestContainerStats|TestContainerListStats.*|TestContainerConsumedStats|TestPodHostname|TestContainerLogWithoutTailingNewLine|TestLongContainerLog|TestContainerStopCancellation|TestSharedPidMultiProcessContainerStop|TestAdditionalGids|TestContainerSymlinkVolumes|TestVolumeCopyUp|TestVolumeOwnership|TestDuplicateName|TestTruncIndex|TestRunPodSandboxWithoutMetadata|TestCreateContainerWithoutMetadata|TestContainerdImage.*|TestImageFSInfo|TestPodDualStack|TestRuntimeHandler|TestContainerdRestart|TestSandboxRemoveWithoutIPLeakage|TestContainerLifecycleWithoutImageRef|TestUpdateContainerResources.*)$'
tests=${1:-$default_tests}

# --- 1. containerd's source and Debian's Go libraries (downloaded once) -----------------
src=$cache/containerd-1.6.20~ds1
root=$cache/root
if [ ! -d "$src/integration" ] || [ ! -d "$root/usr/lib/go-1.19" ]; then
  echo "cri-integration: fetching containerd's source and Go libraries from Debian"
  command -v dpkg-source >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends dpkg-dev
  apt=$cache/apt
  mkdir -p "$apt/lists/partial"
  printf 'deb-src http://deb.debian.org/debian bookworm main\ndeb-src http://deb.debian.org/debian-security bookworm-security main\n' > "$apt/src.list"
  aopts=(-o "Dir::Etc::SourceList=$apt/src.list" -o Dir::Etc::SourceParts=/dev/null -o "Dir::State::Lists=$apt/lists")
  apt-get "${aopts[@]}" update -q
  (cd "$cache" && apt-get "${aopts[@]}" source -q --download-only containerd=1.6.20~ds1-1+deb12u3 &&
     rm -rf "$src" && dpkg-source -x containerd_1.6.20~ds1-1+deb12u3.dsc "$src")
  mkdir -p "$cache/debs" "$root"
  # Unpacked, never installed: some (go-systemd) would pull systemd upgrades in.
  (cd "$cache/debs" && apt-get download -q $(cat "$repo/tests/cri-integration/go-packages.txt"))
  for d in "$cache"/debs/*.deb; do dpkg-deb -x "$d" "$root"; done
fi
bin=$cache/cri-integration.test
if [ ! -x "$bin" ]; then
  echo "cri-integration: building the test binary (GOPATH mode, Debian's Go 1.19)"
  gopath=$cache/gopath
  rm -rf "$gopath" && mkdir -p "$gopath/src/github.com/containerd"
  cp -a "$src" "$gopath/src/github.com/containerd/containerd"
  (cd "$gopath/src/github.com/containerd/containerd" &&
    GOROOT=$root/usr/lib/go-1.19 PATH=$root/usr/lib/go-1.19/bin:$PATH \
    GOPATH=$gopath:$root/usr/share/gocode GO111MODULE=off GOPROXY=off GOFLAGS= CGO_ENABLED=0 \
    GOCACHE=$cache/gocache go test -c -o "$bin" ./integration)
fi

# --- 2. Images, built locally, served by a registry of the test's own --------------------
# Some tests pull (or delete and pull again): Debian's docker-registry on 127.0.0.1:5000
# in containerd's network namespace, where containerd talks plain HTTP to localhost.
for p in docker-registry skopeo; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" ||
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$p" >/dev/null
done
reg=127.0.0.1:5000
mkdir -p "$out"
img() { # name cmd-json [extra-env...]
  local tar=$cache/$(echo "$1" | tr '/:' '__').tar
  [ -f "$tar" ] || env "${@:3}" VMBOX_IMAGE_CMD="$2" "$repo/tests/containerd/build-image.sh" "$tar" "$1" >/dev/null
  echo "$tar"
}
busybox=$(img $reg/vmbox/busybox:latest '["sh"]')
pause=$(img $reg/vmbox/pause:latest '["sleep","2147483647"]')
copyup=$(img $reg/vmbox/volume-copy-up:latest '["sh"]' VMBOX_IMAGE_FILES='test_dir/test_file=test_content\n' VMBOX_IMAGE_VOLUMES=/test_dir)
# Kubernetes' resource-consumer image is `stress` (TestContainerConsumedStats): Debian's,
# with the libraries it links, on busybox.
stress_root=$cache/stress-root
if [ ! -x "$stress_root/usr/bin/stress" ]; then
  rm -rf "$cache/stress" && mkdir -p "$cache/stress" "$stress_root/usr/bin"
  (cd "$cache/stress" && apt-get download -q stress >/dev/null 2>&1 && dpkg-deb -x stress_*.deb x)
  cp "$cache/stress/x/usr/bin/stress" "$stress_root/usr/bin/"
  for lib in $(ldd "$stress_root/usr/bin/stress" | grep -o '/[^ ]*'); do
    mkdir -p "$stress_root$(dirname "$lib")" && cp -L "$lib" "$stress_root$lib"
  done
fi
consumer=$(img $reg/vmbox/resource-consumer:latest '["sleep","2147483647"]' VMBOX_IMAGE_ADD="$stress_root")
owner=$(img $reg/vmbox/volume-ownership:latest '["sh"]' VMBOX_IMAGE_FILES="test_dir/.keep=" VMBOX_IMAGE_OWNER="test_dir=65534:65534" VMBOX_IMAGE_VOLUMES=/test_dir)
cat > "$out/images.toml" <<TOML
alpine = "$reg/vmbox/busybox:latest"
busybox = "$reg/vmbox/busybox:latest"
pause = "$reg/vmbox/pause:latest"
ResourceConsumer = "$reg/vmbox/resource-consumer:latest"
VolumeCopyUp = "$reg/vmbox/volume-copy-up:latest"
VolumeOwnership = "$reg/vmbox/volume-ownership:latest"
TOML

# --- 3. A private containerd with CRI, in a network namespace of its own -----------------
stop_all() {
  [ -f "$out/registry.pid" ] && kill "$(cat "$out/registry.pid")" 2>/dev/null || true
  [ -f "$out/supervisor.pid" ] && kill "$(cat "$out/supervisor.pid")" 2>/dev/null || true
  pkill -x "$ctrd_name" 2>/dev/null || true
  for _ in $(seq 1 100); do pgrep -x "$ctrd_name" >/dev/null || break; sleep 0.1; done
  rm -f "$out/supervisor.pid"
}
trap 'stop_all; ip netns del "$netns" 2>/dev/null || true' EXIT
stop_all
ip netns list | grep -qw "$netns" || ip netns add "$netns"
ip -n "$netns" link set lo up
mkdir -p "$out/net.d" "$out/bin"
ln -sf "$(command -v containerd)" "$out/bin/$ctrd_name"
cat > "$out/net.d/10-vmbox-cri-it.conflist" <<JSON
{"cniVersion": "0.4.0", "name": "vmbox-cri-it", "plugins": [
  {"type": "bridge", "bridge": "vmboxit0", "isGateway": true, "ipMasq": false,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.89.0.0/16"}], [{"subnet": "fd00:89::/64"}]],
            "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}]}}]}
JSON
cat > "$out/vmbox.toml" <<TOML
state_dir = "$out/vmbox"
[vm]
kernel = "$repo/build/guest/vmlinux"
initramfs = "$repo/build/guest/initramfs.img"
[timeouts]
boot_ms = 60000
TOML
cat > "$out/config.toml" <<TOML
version = 2
root = "$out/root"
state = "$out/state"
[grpc]
  address = "$out/containerd.sock"
[ttrpc]
  address = "$out/containerd.sock.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$reg/vmbox/pause:latest"
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "vmbox"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.vmbox]
      runtime_type = "io.containerd.vmbox.v2"
      privileged_without_host_devices = true
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$out/net.d"
TOML
# TestContainerdRestart kills containerd by name and waits for it to come back.
(
  while true; do
    PATH="$repo/target/release:$PATH" VMBOX_CONFIG="$out/vmbox.toml" \
      nsenter "--net=/var/run/netns/$netns" "$out/bin/$ctrd_name" --config "$out/config.toml" \
      >> "$out/containerd.log" 2>&1 < /dev/null || true
    # Longer than the test's 1 s poll for "containerd is gone" (restart_test.go), or
    # it may only ever see the next containerd.
    sleep 2.5
  done
) &
echo $! > "$out/supervisor.pid"
for _ in $(seq 1 100); do
  ctr --address "$out/containerd.sock" version >/dev/null 2>&1 && break
  sleep 0.1
done
cat > "$out/registry.yml" <<YML
version: 0.1
log: {level: warn}
storage: {filesystem: {rootdirectory: $out/registry}}
http: {addr: $reg}
YML
nsenter "--net=/var/run/netns/$netns" docker-registry serve "$out/registry.yml" >> "$out/registry.log" 2>&1 &
echo $! > "$out/registry.pid"
for t in "$busybox" "$pause" "$copyup" "$owner" "$consumer"; do
  name=$(tar -xOf "$t" ./index.json | sed 's/.*"io.containerd.image.name":"\([^"]*\)".*/\1/')
  for _ in $(seq 1 50); do
    nsenter "--net=/var/run/netns/$netns" skopeo copy -q --dest-tls-verify=false "oci-archive:$t" "docker://$name" 2>>"$out/registry.log" && break
    sleep 0.2
  done
  ctr --address "$out/containerd.sock" -n k8s.io image import "$t" >/dev/null
done

# --- 4. The tests ------------------------------------------------------------------------
echo "cri-integration: running $tests"
set +e
# In containerd's network namespace too: some tests pull from the registry themselves.
(cd "$src/integration" && nsenter "--net=/var/run/netns/$netns" "$bin" -test.v -test.timeout 60m -test.run "$tests" \
  -cri-endpoint "unix://$out/containerd.sock" -cri-root "$out/root/io.containerd.grpc.v1.cri" \
  -runtime-handler vmbox -containerd-bin "$ctrd_name" -image-list "$out/images.toml") > "$out/tests.log" 2>&1
rc=$?
set -e
grep -E '^(--- |=== RUN|ok |FAIL|PASS)' "$out/tests.log" | grep -E '^--- ' || true
echo "cri-integration: $(grep -c '^--- PASS' "$out/tests.log") passed, $(grep -c '^--- FAIL' "$out/tests.log") failed, $(grep -c '^--- SKIP' "$out/tests.log") skipped (log: $out/tests.log)"
exit $rc
