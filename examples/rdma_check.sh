#!/usr/bin/env bash
# rdma_check.sh: is this host ready for the verbs data plane, and does a write really go over verbs?
#
# The verbs backend has NEVER RUN ON HARDWARE: no host of this project has an RDMA device or the
# kernel RDMA subsystem. This script is what a user runs first on a real RoCE v2 or InfiniBand host.
#
# Usage:
#   examples/rdma_check.sh [-d DEVICE] [-p PORT] [-g GID_INDEX]          one host: two local processes
#   examples/rdma_check.sh [-d DEVICE] ... --two-hosts RECEIVER_IP          checks, then prints the two
#                                                                          commands for a two-host run
#   -n: checks only (no bench)   -t: also run tests/test_transport.py and tests/test_verbs.py
#   -b: the byte check on a region over 1 GiB instead of 64 MiB (one write > 1 GiB; ~4 GiB of memory,
#       and a locked-memory limit to match: set MEMLOCK_MIN_KIB=4194304 to have step 4 check it)
#
# Steps, each printing "PASS <step>: ..." or "FAIL <step>: <reason>". The first FAIL ends the
# script with that step's exit status (1 devices, 2 port, 3 RoCE v2 GID, 4 memlock, 5 pyverbs,
# 6 dualpath, 7 bench did not run, 8 bench ran but not on verbs, 9 bytes differ or not on verbs,
# 10 tests):
#   1. RDMA devices present (ibv_devices, else `rdma link`, else /sys/class/infiniband)
#   2. a port in state ACTIVE (sysfs ports/N/state; its link_layer: InfiniBand or Ethernet = RoCE)
#   3. Ethernet only: a RoCE v2 GID (sysfs ports/N/gid_attrs/types/I = "RoCE v2", gids/I not empty)
#   4. locked-memory limit (ulimit -l) unlimited or >= MEMLOCK_MIN_KIB (default 512 MiB): every MR pins
#   5. pyverbs importable and listing the device
#   6. the dualpath package importable
#   7. `dualpath bench transport --backend verbs` between two processes of this host
#   8. the backend each end and each link actually used (the bench's JSON: backend_used, links,
#      all_links_requested): PASS only if all are verbs. make_dataplane falls back to tcp with one
#      warning when verbs cannot start; that is a FAIL here, not a pass.
#   9. every byte checked: odd-sized writes at random offsets, 0-byte writes, single bytes at both
#      ends, one 64 MiB write (with -b one over 1 GiB), the receiver's region hashed against what
#      they must have left (`python -m dualpath.bench.transport_bench --verify`), and again on verbs.
# One host runs both ends through one NIC (the NIC loops the traffic back): it proves setup, QPs,
# registration and completions, not the fabric. The two-host run is the real check.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

DEV="" PORT="" GID="" RX_IP="" CHECKS_ONLY=0 RUN_TESTS=0 BIG=0
MEMLOCK_MIN_KIB=${MEMLOCK_MIN_KIB:-524288}
OUT=${OUT:-runs/bench_transport_verbs.json}
PY=${PYTHON:-python3}
while [ $# -gt 0 ]; do
    case "$1" in
        -d) DEV=$2; shift 2 ;;
        -p) PORT=$2; shift 2 ;;
        -g) GID=$2; shift 2 ;;
        -n) CHECKS_ONLY=1; shift ;;
        -t) RUN_TESTS=1; shift ;;
        -b) BIG=1; shift ;;
        --two-hosts) RX_IP=$2; shift 2 ;;
        -h|--help) sed -n '2,/^set -uo pipefail/{/^set/d;p;}' "$0"; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 64 ;;
    esac
done

pass() { echo "PASS $1: $2"; }
info() { echo "     $1"; }
fail() {  # step, exit status, reason
    echo "FAIL $1: $3"
    echo "rdma_check: stopped at step '$1' (exit $2): $3" >&2
    exit "$2"
}

SYS=${RDMA_SYSFS:-/sys/class/infiniband}  # RDMA_SYSFS: a fake tree, to try the script without a device

# -- 1. devices --
devices=()
if command -v ibv_devices >/dev/null 2>&1; then
    mapfile -t devices < <(ibv_devices 2>/dev/null | awk 'NR > 2 && NF {print $1}')
    how="ibv_devices"
elif command -v rdma >/dev/null 2>&1; then
    mapfile -t devices < <(rdma link show 2>/dev/null | awk '{split($2, a, "/"); print a[1]}' | sort -u)
    how="rdma link (ibv_devices not installed: rdma-core's ibverbs-utils has it)"
else
    how="neither ibv_devices nor rdma (iproute2) installed"
fi
if [ ${#devices[@]} -eq 0 ] && [ -d "$SYS" ]; then
    mapfile -t devices < <(ls "$SYS")
    how="$how; $SYS"
fi
if [ ${#devices[@]} -eq 0 ]; then
    why="no RDMA device ($how lists none)"
    [ -d "$SYS" ] || why="$why; $SYS does not exist: no kernel RDMA subsystem (ib_core/ib_uverbs and a NIC driver such as mlx5_ib are not loaded)"
    fail devices 1 "$why"
fi
if [ -n "$DEV" ]; then
    printf '%s\n' "${devices[@]}" | grep -qx "$DEV" || fail devices 1 "device $DEV not among: ${devices[*]}"
else
    DEV=${devices[0]}
fi
pass devices "${devices[*]} ($how); using $DEV"
[ -d "$SYS/$DEV" ] || fail devices 1 "$SYS/$DEV missing: the device is listed but sysfs has no entry for it"

# -- 2. port ACTIVE --
ports=()
for p in "$SYS/$DEV"/ports/*; do ports+=("${p##*/}"); done
[ ${#ports[@]} -gt 0 ] || fail port 2 "$DEV has no ports in $SYS/$DEV/ports"
active=""
for p in "${ports[@]}"; do
    state=$(cat "$SYS/$DEV/ports/$p/state" 2>/dev/null)
    info "port $p: ${state:-?}, $(cat "$SYS/$DEV/ports/$p/phys_state" 2>/dev/null), link_layer $(cat "$SYS/$DEV/ports/$p/link_layer" 2>/dev/null)"
    if [[ $state == *ACTIVE* ]] && { [ -z "$PORT" ] || [ "$PORT" = "$p" ]; } && [ -z "$active" ]; then active=$p; fi
done
[ -n "$active" ] || fail port 2 "no ACTIVE port on $DEV${PORT:+ (asked for port $PORT)}: check the cable/switch, and 'ibstat' / 'rdma link show' (InfiniBand also needs a subnet manager: opensm)"
PORT=$active
LL=$(cat "$SYS/$DEV/ports/$PORT/link_layer" 2>/dev/null)
pass port "$DEV port $PORT ACTIVE, link_layer ${LL:-unknown}"

# -- 3. RoCE v2 GID (Ethernet) --
if [ "$LL" = "Ethernet" ]; then
    v2=""
    for t in "$SYS/$DEV/ports/$PORT"/gid_attrs/types/*; do
        i=${t##*/}
        type=$(cat "$t" 2>/dev/null) || continue  # reading an empty slot fails (EINVAL)
        gid=$(cat "$SYS/$DEV/ports/$PORT/gids/$i" 2>/dev/null)
        [ "$type" = "RoCE v2" ] || continue
        [ -n "$gid" ] && [ "$gid" != "0000:0000:0000:0000:0000:0000:0000:0000" ] || continue
        ndev=$(cat "$SYS/$DEV/ports/$PORT/gid_attrs/ndevs/$i" 2>/dev/null)
        info "GID $i: $gid RoCE v2 on ${ndev:-?}"
        if [ -n "$GID" ]; then [ "$GID" = "$i" ] && v2=$i
        elif [ -z "$v2" ] && [[ $gid != fe80:* ]]; then v2=$i  # routable first, as the plane chooses
        fi
    done
    [ -n "$v2" ] || fail roce-gid 3 "no ${GID:+index $GID }RoCE v2 GID with an address on $DEV port $PORT (configure an IP address on its netdev; 'show_gids' lists the table)"
    GID=$v2
    pass roce-gid "index $GID (RoCE v2); DUALPATH_RDMA_GID_INDEX=$GID"
else
    pass roce-gid "not Ethernet (link_layer ${LL:-unknown}): InfiniBand uses GID 0, no RoCE GID needed"
fi

# -- 4. memlock --
lim=$(ulimit -l)
if [ "$lim" != "unlimited" ] && [ "$lim" -lt "$MEMLOCK_MIN_KIB" ]; then
    fail memlock 4 "ulimit -l is $lim KiB, below $MEMLOCK_MIN_KIB KiB: memory registration pins pages against it (raise it: 'ulimit -l unlimited', /etc/security/limits.conf memlock, docker --ulimit memlock=-1, or CAP_IPC_LOCK)"
fi
if [ "$lim" = unlimited ]; then pass memlock "ulimit -l unlimited"; else pass memlock "ulimit -l $lim KiB"; fi

# -- 5. pyverbs --
if ! msg=$("$PY" - "$DEV" <<'PY' 2>&1
import sys
import pyverbs.device as d
names = [x.name.decode() for x in d.get_device_list()]
if sys.argv[1] not in names:
    sys.exit(f"pyverbs lists {names}, not {sys.argv[1]}")
print(f"pyverbs {getattr(__import__('pyverbs'), '__file__', '?')} lists {names}")
PY
); then
    fail pyverbs 5 "pyverbs not importable or blind to $DEV with $PY: $(echo "$msg" | tail -1) (apt-get install python3-pyverbs, or rdma-core's build)"
fi
pass pyverbs "$msg"

# -- 6. dualpath --
msg=$("$PY" -c "import dualpath.transport.verbs, dualpath.bench.transport_bench; print('dualpath', dualpath.__file__)" 2>&1) ||
    fail dualpath 6 "the dualpath package does not import with $PY: $(echo "$msg" | tail -1) (pip install -e .)"
pass dualpath "$msg"

export DUALPATH_RDMA_DEVICE=$DEV DUALPATH_RDMA_PORT=$PORT
[ -n "$GID" ] && export DUALPATH_RDMA_GID_INDEX=$GID

if [ -n "$RX_IP" ]; then
    cat <<EOF
== two hosts: run these (same DUALPATH_BENCH_TOKEN on both; run this script on both hosts first)
  receiver, on the host at $RX_IP:
    DUALPATH_RDMA_DEVICE=<its device> DUALPATH_BENCH_TOKEN=<secret> \\
      $PY -m dualpath.bench.transport_bench --role rx --backend verbs --host $RX_IP --handles /tmp/dualpath_bench_handles.json
  copy /tmp/dualpath_bench_handles.json from it to the writer's host, then on the writer:
    DUALPATH_RDMA_DEVICE=$DEV DUALPATH_BENCH_TOKEN=<secret> \\
      $PY -m dualpath.bench.transport_bench --role tx --backend verbs --handles /tmp/dualpath_bench_handles.json --out $OUT
  The writer's last line must say "writer verbs links {'$RX_IP:<port>': 'verbs'} ... all writer links verbs: yes"
  and the receiver print "receiver verbs: {... 'accepted_qps': N}" with N > 0 once the writer has connected;
  "tcp" on either end means a fallback (the warning above it says why).
  Every byte: run both again with --verify; the receiver's region sha256 (printed once it is ended with
  Ctrl-C) must equal the one the writer prints. Compare the 64 MiB row with ib_write_bw, same two hosts:
    $RX_IP\$ ib_write_bw -d <dev> -s 67108864 -n 200 --report_gbits -F
    writer\$ ib_write_bw -d $DEV -s 67108864 -n 200 --report_gbits -F $RX_IP
EOF
    exit 0
fi
[ "$CHECKS_ONLY" = 1 ] && { echo "checks passed (-n: no bench)"; exit 0; }

# -- 7. the bench, two local processes --
if dualpath --help >/dev/null 2>&1; then bench=(dualpath bench transport); else bench=("$PY" -m dualpath.cli bench transport); fi
echo "== ${bench[*]} --backend verbs --out $OUT (device $DEV, port $PORT${GID:+, GID $GID})"
"${bench[@]}" --backend verbs --seconds "${SECONDS_PER_SIZE:-1}" --out "$OUT" || fail bench 7 "the bench exited with status $? (its output above)"

# -- 8. the backend each end and link used --
verdict=$("$PY" - "$OUT" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
u = r["backend_used"]
w, rx = u["writer"], u.get("receiver") or {}
print(f"writer {w['backend']} links {w['links']} qps {w.get('qps', 0)}; receiver {rx.get('backend', '?')} "
      f"accepted qps {rx.get('accepted_qps', 0)}")
sys.exit(0 if r["all_links_requested"] and rx.get("accepted_qps", 0) > 0 else 1)
PY
)
ok=$?
[ $ok -eq 0 ] || fail backend 8 "not all on verbs: $verdict (a fallback to tcp: see the warning in the bench's output)"
pass backend "$verdict"

# -- 9. every byte --
vflags=(--verify)
[ "$BIG" = 1 ] && vflags=(--verify-big)
vout=${OUT%.json}_verify.json
vlog=$("$PY" -m dualpath.bench.transport_bench --backend verbs "${vflags[@]}" --out "$vout" 2>&1)
vrc=$?
echo "$vlog" | tail -3
[ $vrc -eq 0 ] || fail bytes 9 "the receiver's region differs from what the writes must have left ($vout)"
verdict=$("$PY" -c 'import json, sys; r = json.load(open(sys.argv[1])); print(r["backend_used"]["writer"]["backend"]); sys.exit(0 if r["all_links_requested"] else 1)' "$vout") ||
    fail bytes 9 "bytes matched, but the writer ran $verdict, not verbs"
pass bytes "every byte matched, over verbs ($vout)"

if [ "$RUN_TESTS" = 1 ]; then
    "$PY" -m pytest -q tests/test_transport.py tests/test_verbs.py || fail tests 10 "pytest failed"
    pass tests "tests/test_transport.py tests/test_verbs.py"
fi
echo "all checks passed on $DEV port $PORT (one host: both ends through one NIC; run --two-hosts next)"
