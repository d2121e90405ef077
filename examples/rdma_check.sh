#!/usr/bin/env bash
# First run of the verbs backend on a real RDMA host (InfiniBand or RoCE). It has never run on
# hardware: this project's machines have no RDMA device. Needs rdma-core (ibv_devinfo,
# python3-pyverbs), perftest (ib_write_bw) and this package. Usage: examples/rdma_check.sh [device]
#
# Expected output, in order:
#   1. ibv_devinfo: your device with at least one port "state: PORT_ACTIVE (4)", its active_mtu and
#      link_layer (InfiniBand or Ethernet: RoCE).
#   2. ib_write_bw (loopback, 64 MiB messages): a BW average near line rate, e.g. ~ 45000 MB/s on
#      400 Gb/s; this is the ceiling for step 3.
#   3. "verbs write: backend verbs/verbs, ... GB/s, bytes verified" from two processes: the
#      receiver's completion fired by the WRITE WITH IMM, the bytes checked. Expect a good fraction
#      of step 2 for 64 MiB writes; "backend tcp" means verbs fell back (the warning says why).
#   4. tests/test_transport.py runs its conformance suite on verbs instead of skipping it, and
#      tests/test_verbs.py passes.
set -euo pipefail
cd "$(dirname "$0")/.."
DEV=${1:-$(ibv_devices | awk 'NR>2 {print $1; exit}')}
[ -n "$DEV" ] || { echo "no RDMA device (ibv_devices lists none)"; exit 1; }

echo "== 1. device $DEV"
ibv_devinfo -d "$DEV" | grep -E "hca_id|port:|state|active_mtu|link_layer|phys_state"
export DUALPATH_RDMA_DEVICE=$DEV

echo "== 2. ib_write_bw loopback (perftest)"
if command -v ib_write_bw >/dev/null; then
    ib_write_bw -d "$DEV" -s $((64 << 20)) -n 200 --report_gbits -F >/tmp/ib_write_bw_server.log 2>&1 &
    sleep 1
    ib_write_bw -d "$DEV" -s $((64 << 20)) -n 200 --report_gbits -F 127.0.0.1 | tail -3
    wait
else
    echo "perftest is not installed (apt-get install perftest): skipped"
fi

echo "== 3. two-process verbs write, 64 MiB x 20"
rm -f /tmp/dualpath_rdma_handle.json
python3 - <<'PY' &
import asyncio, json, os, torch
from dualpath.transport import make_dataplane
from dualpath.transport.verbs import RdmaOptions

async def main():
    got = asyncio.Event()
    dp = make_dataplane("verbs", "receiver", "check", rdma=RdmaOptions(device=os.environ["DUALPATH_RDMA_DEVICE"]),
                        on_complete=lambda n: got.set() if n == "last" else None)
    await dp.start("127.0.0.1")
    buf = torch.zeros(64 << 20, dtype=torch.uint8)
    handle = dp.register(buf)
    json.dump({"handle": handle, "backend": dp.backend}, open("/tmp/dualpath_rdma_handle.json.tmp", "w"))
    os.rename("/tmp/dualpath_rdma_handle.json.tmp", "/tmp/dualpath_rdma_handle.json")
    await asyncio.wait_for(got.wait(), 120)
    ok = torch.equal(buf[:4096], torch.arange(4096, dtype=torch.int64).to(torch.uint8))
    print("receiver: bytes verified" if ok else "receiver: BYTES DIFFER")
    await dp.close()

asyncio.run(main())
PY
RECV=$!
python3 - <<'PY'
import asyncio, json, os, time, torch
from dualpath.transport import make_dataplane
from dualpath.transport.verbs import RdmaOptions

async def main():
    while not os.path.exists("/tmp/dualpath_rdma_handle.json"):
        await asyncio.sleep(0.1)
    info = json.load(open("/tmp/dualpath_rdma_handle.json"))
    dp = make_dataplane("verbs", "writer", "check", rdma=RdmaOptions(device=os.environ["DUALPATH_RDMA_DEVICE"]))
    await dp.start("127.0.0.1")
    src = torch.arange(64 << 20, dtype=torch.int64).to(torch.uint8)
    dp.register(src)  # the source is a registered region, as an engine's DRAM buffer is
    await dp.write(src, info["handle"], 0, src.numel(), "bulk")  # QP setup, not timed
    t0 = time.perf_counter()
    for i in range(20):
        await dp.write(src, info["handle"], 0, src.numel(), "bulk", notify="last" if i == 19 else None)
    dt = time.perf_counter() - t0
    print(f"verbs write: backend {dp.backend}/{info['backend']}, links {dp.links()}, "
          f"{20 * src.numel() / dt / 1e9:.1f} GB/s")
    await dp.close()

asyncio.run(main())
PY
wait $RECV

echo "== 4. conformance suite and verbs unit tests"
python3 -m pytest -q tests/test_transport.py tests/test_verbs.py
