#!/usr/bin/env bash
# A three-host DualPath cluster on this machine, for teaching (root only): each host is a network
# namespace on a bridge, with its link shaped by tc to emulate a compute NIC; the coordinator and
# the PE run on host 0, a DE on each other host; all share one store directory, as a distributed
# file system is shared. It runs the demo conversation, prints each host's storage-NIC and
# compute-network traffic, and removes everything it made.
#   sudo bash examples/multihost.sh [compute-NIC rate, default 200mbit]
set -euo pipefail
RATE=${1:-200mbit}
TAG=dpdemo$$; SUB=10.78.$(( $$ % 250 + 1 )); WORK=$(mktemp -d)
ns() { echo "${TAG}h$1"; }
cleanup() {
  pkill -f "$WORK/cluster.toml" 2>/dev/null || true
  for _ in $(seq 20); do pgrep -f "$WORK/cluster.toml" >/dev/null || break; sleep 0.5; done
  pkill -9 -f "$WORK/cluster.toml" 2>/dev/null || true
  for i in 0 1 2; do ip netns del "$(ns $i)" 2>/dev/null || true; done
  ip netns del "${TAG}sw" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
ip netns add "${TAG}sw"; ip -n "${TAG}sw" link add br0 type bridge; ip -n "${TAG}sw" link set br0 up
for i in 0 1 2; do
  ip netns add "$(ns $i)"; ip -n "$(ns $i)" link set lo up
  ip -n "$(ns $i)" link add eth0 type veth peer name "p$i" netns "${TAG}sw"
  ip -n "$(ns $i)" addr add "$SUB.$((i + 1))/24" dev eth0; ip -n "$(ns $i)" link set eth0 up
  ip -n "${TAG}sw" link set "p$i" master br0; ip -n "${TAG}sw" link set "p$i" up
  ip netns exec "$(ns $i)" tc qdisc add dev eth0 root tbf rate "$RATE" burst 256kb latency 50ms  # the compute NIC
done
python3 - "$WORK" "$SUB" <<'PY'
import sys
from dualpath.config import local_cluster, write_config
work, sub = sys.argv[1], sys.argv[2]
cfg = local_cluster(1, 2, base_port=7100)
cfg.store.root, cfg.transport.backend = f"{work}/store", "tcp"
cfg.scheduler.host = f"{sub}.1"
for i, e in enumerate(cfg.engines):
    e.host = f"{sub}.{i + 1}"
write_config(cfg, f"{work}/cluster.toml")
PY
run() { ip netns exec "$(ns $1)" python3 -m dualpath.cli run --role "$2" --node "$3" --config "$WORK/cluster.toml" \
          > "$WORK/$2$3.log" 2>&1 & }
run 0 coordinator 0; run 0 prefill 0; run 1 decode 1; run 2 decode 2
ip netns exec "$(ns 0)" python3 - "$SUB" <<'PY'
import json, sys, time, urllib.request
from dualpath.launcher import demo_conversation
url = f"http://{sys.argv[1]}.1:8000"
for _ in range(300):
    try:
        if urllib.request.urlopen(url + "/healthz", timeout=2).status == 200:
            break
    except OSError:
        time.sleep(0.2)
demo_conversation(url)
print("\nper host: storage-NIC bytes read / written, compute-network bytes sent (latency, bulk)")
for name, e in sorted(json.load(urllib.request.urlopen(url + "/v1/cluster"))["engines"].items()):
    net = e.get("network_sent_bytes", {})
    print(f"  {name} (node {e['node']}): read {e['storage_read_bytes']:>10,}  written {e['storage_write_bytes']:>10,}"
          f"  sent {net.get('latency', 0):>10,} / {net.get('bulk', 0):>10,}  ({e['transport']})")
PY
