#!/usr/bin/env bash
# A private containerd for vmbox: its own root, state and socket under $VMBOX_CTR_DIR
# (default /run/vmbox-containerd), never the system one.
#   containerd.sh start | stop | address
# The shim is found through PATH (containerd passes its own PATH on): start puts
# $VMBOX_SHIM_DIR (default /usr/local/bin) first.
set -euo pipefail
dir=${VMBOX_CTR_DIR:-/run/vmbox-containerd}
sock=$dir/containerd.sock
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
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$sock"
[ttrpc]
  address = "$sock.ttrpc"
[debug]
  level = "${VMBOX_CTR_LOG_LEVEL:-info}"
TOML
    PATH="${VMBOX_SHIM_DIR:-/usr/local/bin}:$PATH" setsid containerd --config "$dir/config.toml" \
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
    fi ;;
  *) echo "usage: containerd.sh start|stop|address" >&2; exit 2 ;;
esac
