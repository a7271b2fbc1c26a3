#!/usr/bin/env bash
# A private containerd for vmbox: its own root, state and socket under $VMBOX_CTR_DIR
# (default /run/vmbox-containerd), never the system one.
#   containerd.sh start | stop | address   (VMBOX_CTR_KEEP_NETNS=1 stop: for a restart;
#   stop also stops the warm pool's standby VMs of the vmbox config in $VMBOX_CONFIG)
# The shim is found through PATH (containerd passes its own PATH on): start puts
# $VMBOX_SHIM_DIR (default /usr/local/bin) first.
#
# VMBOX_CTR_CRI=1 enables containerd's CRI plugin (Kubernetes' view): runtime handlers
# "vmbox" (the default) and "runc", sandbox image $VMBOX_PAUSE_IMAGE (imported locally,
# no registry), CNI bridge + host-local from /usr/lib/cni. containerd then runs in a
# network namespace of its own ("node" netns $VMBOX_CTR_NETNS, made and removed here), so
# the CNI bridge, its addresses and its routes never touch the host's network.
set -euo pipefail
dir=${VMBOX_CTR_DIR:-/run/vmbox-containerd}
sock=$dir/containerd.sock
cri=${VMBOX_CTR_CRI:-0}
netns=${VMBOX_CTR_NETNS:-vmbox-cri-node}
pause=${VMBOX_PAUSE_IMAGE:-docker.io/vmbox/pause:latest}
case "${1:-}" in
  address) echo "$sock" ;;
  start)
    if [ -S "$sock" ] && ctr --address "$sock" version >/dev/null 2>&1; then
      echo "containerd already running on $sock"; exit 0
    fi
    mkdir -p "$dir"
    cat > "$dir/config.toml" <<TOML
version = 2
root = "$dir/root"
state = "$dir/state"
[grpc]
  address = "$sock"
[ttrpc]
  address = "$sock.ttrpc"
[debug]
  level = "${VMBOX_CTR_LOG_LEVEL:-info}"
TOML
    enter=()
    if [ "$cri" = 1 ]; then
      mkdir -p "$dir/net.d"
      cat > "$dir/net.d/10-vmbox-cri.conflist" <<JSON
{"cniVersion": "0.4.0", "name": "vmbox-cri", "plugins": [
  {"type": "bridge", "bridge": "vmboxbr0", "isGateway": true, "ipMasq": false, "mtu": 1400,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.88.0.0/16"}], [{"subnet": "fd00:88::/64"}]],
            "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}]}}]}
JSON
      cat >> "$dir/config.toml" <<TOML
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$pause"
  # Pod network namespaces under the state dir: a run that is killed leaves none in
  # /var/run/netns (the next run's reset unmounts everything under its directory).
  netns_mounts_under_state_dir = true
  # CRI gives pause oom_score_adj -998; where even root may not lower its own score (a
  # container or a confined VM as CI machine), runc's pods fail without this clamp.
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "vmbox"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.vmbox]
      runtime_type = "io.containerd.vmbox.v2"
      # A privileged pod must not get the host's devices: they are not the VM's.
      privileged_without_host_devices = true
      pod_annotations = ["io.vmbox.*"]
    # A second RuntimeClass handler with a vmbox config of its own (the file is the
    # caller's; see tests/src/cri.rs).
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.vmbox-small]
      runtime_type = "io.containerd.vmbox.v2"
      privileged_without_host_devices = true
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.vmbox-small.options]
        ConfigPath = "$dir/vmbox-small.toml"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$dir/net.d"
TOML
      ip netns list | grep -qw "$netns" || ip netns add "$netns"
      ip -n "$netns" link set lo up
      # Only the network namespace: `ip netns exec` would also give containerd a mount
      # namespace of its own, hiding its mounts from the host.
      enter=(nsenter "--net=/var/run/netns/$netns")
    else
      sed -i '/^state = /a disabled_plugins = ["io.containerd.grpc.v1.cri"]' "$dir/config.toml"
    fi
    PATH="${VMBOX_SHIM_DIR:-/usr/local/bin}:$PATH" setsid "${enter[@]}" containerd --config "$dir/config.toml" \
      > "$dir/containerd.log" 2>&1 < /dev/null &
    echo $! > "$dir/containerd.pid"
    for _ in $(seq 1 100); do
      if ctr --address "$sock" version >/dev/null 2>&1; then echo "containerd up on $sock (log: $dir/containerd.log)"; exit 0; fi
      sleep 0.1
    done
    echo "containerd did not come up within 10 s; its log:" >&2; tail -20 "$dir/containerd.log" >&2; exit 1 ;;
  stop)
    if [ -f "$dir/containerd.pid" ]; then
      pid=$(cat "$dir/containerd.pid")
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      rm -f "$dir/containerd.pid"
    fi
    # The warm pool's standby VMs (pool.size in the vmbox config of $VMBOX_CONFIG) are
    # no shims of containerd's: stop them too.
    shim="${VMBOX_SHIM_DIR:-/usr/local/bin}/containerd-shim-vmbox-v2"
    if [ -x "$shim" ]; then "$shim" pool drain >/dev/null 2>&1 || true; fi
    # The node netns (and the pods' veths on its bridge) outlives a restart
    # (VMBOX_CTR_KEEP_NETNS=1); a plain stop removes it.
    if [ "$cri" = 1 ] && [ "${VMBOX_CTR_KEEP_NETNS:-0}" != 1 ] && ip netns list | grep -qw "$netns"; then
      ip netns del "$netns"
    fi ;;
  *) echo "usage: containerd.sh start|stop|address" >&2; exit 2 ;;
esac
