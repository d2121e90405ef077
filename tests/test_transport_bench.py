"""`dualpath bench transport`'s small-write mode (issue #34): it runs, with tiny counts, on the
backends every host has (tcp, shm), and writes the fields it promises. No time is asserted: the
figures are the host's, the tests check their shape and that each end says what it really ran."""

from __future__ import annotations

import json

import pytest

from dualpath.bench import mooncake_peer
from dualpath.bench import transport_bench as tb
from dualpath.transport import available_backends

SIZES_KIB = (4, 16, 64, 256)


def _run(backend: str, tmp_path, **kw) -> tuple[dict, dict]:
    out = tmp_path / f"bench_transport_{backend}.json"
    kw.setdefault("rounds", 0)  # the side-by-side shapes have tests of their own
    r = tb.run(backend, 0.01, str(out), small_n=3, inflight=2, small_sizes_kib=SIZES_KIB, large=False,
               echo=False, **kw)
    return r, json.loads(out.read_text())


@pytest.mark.parametrize("backend", ["tcp", "shm"])
def test_small_write_rows_for_every_size_with_latency_and_in_flight_throughput(backend, tmp_path):
    if backend not in available_backends():
        pytest.skip(f"{backend} is not available on this host")
    r, saved = _run(backend, tmp_path)
    assert saved["small_writes"] == r["small_writes"]
    rows = saved["small_writes"]
    assert [row["size_bytes"] for row in rows] == [k << 10 for k in SIZES_KIB]
    for row in rows:
        assert row["traffic_class"] == "bulk"
        one, fl = row["one_at_a_time"], row["in_flight"]
        assert one["n"] == 3 and fl["n"] == 3 and fl["k"] == 2
        assert 0 < one["min_us"] <= one["p50_us"] <= one["p99_us"] <= one["max_us"]
        assert one["min_us"] <= one["mean_us"] <= one["max_us"]
        assert fl["seconds"] > 0 and fl["GBps"] > 0 and fl["writes_per_s"] > 0
        assert fl["GBps"] == pytest.approx(fl["n"] * row["size_bytes"] / fl["seconds"] / 1e9)
    # what each end ran: both the asked-for backend, and the writer's link says so
    used = saved["backend_used"]
    assert used["writer"]["backend"] == backend and used["receiver"]["backend"] == backend
    assert used["writer"]["links"] and set(used["writer"]["links"].values()) == {backend}
    assert saved["all_links_requested"] is True
    # Mooncake's figures ride along as a cited reference, never a threshold
    ref = saved["notes"]["mooncake_reference"]
    assert "reference only" in ref["what"]
    assert ref["published_large_transfer_GBps"]["source"] and ref["measured_here_by_issue_34"]["source"]
    assert saved["write_GBps_by_MiB"] == {}  # large=False: no 1-64 MiB rows
    table = tb.format_small(saved)
    for k in SIZES_KIB:
        assert f"{k} KB" in table
    assert "all links " + backend + ": yes" in tb.format_used(saved)


def test_a_latency_class_run_says_its_class(tmp_path):
    _, saved = _run("tcp", tmp_path, small_class="latency")
    assert {row["traffic_class"] for row in saved["small_writes"]} == {"latency"}


def test_verbs_without_a_device_reports_the_fallback_not_verbs(tmp_path):
    """Asked for verbs where it cannot start, the bench still runs (over tcp) and says so: the
    writer ran tcp and all_links_requested is false (what examples/rdma_check.sh checks)."""
    if "verbs" in available_backends():
        pytest.skip("this host has an RDMA device")
    out = tmp_path / "verbs.json"
    tb.run("verbs", 0.01, str(out), small_n=2, inflight=1, small_sizes_kib=(4,), large=False, rounds=0, echo=False)
    saved = json.loads(out.read_text())
    assert saved["backend_used"]["writer"]["backend"] == "tcp"
    assert saved["all_links_requested"] is False
    assert "all links verbs: NO" in tb.format_used(saved)


def test_percentile_is_nearest_rank_for_any_count():
    assert tb._pct([5.0], 99) == 5.0
    assert tb._pct([3.0, 1.0, 2.0], 50) == 2.0
    xs = [float(i) for i in range(1, 101)]
    assert tb._pct(xs, 50) == 50.0 and tb._pct(xs, 99) == 99.0


def test_the_two_host_receiver_needs_an_address_the_writer_reaches():
    with pytest.raises(SystemExit):
        tb.main(["--role", "rx", "--backend", "tcp"])


def test_verify_cases_cover_empty_odd_edge_and_whole_region_writes():
    region, src = 1 << 20, (1 << 20) + 4096
    cases = tb.verify_cases(region, src, n_random=16, seed=1)
    sizes = [n for _, n, _ in cases]
    assert sizes[0] == region and 0 in sizes and 1 in sizes
    assert sum(n % 2 for n in sizes) >= 16
    assert (region - 1, 1, 5) in cases  # the last byte
    for off, n, soff in cases:
        assert 0 <= off and off + n <= region and 0 <= soff and soff + n <= src
    assert cases == tb.verify_cases(region, src, n_random=16, seed=1)  # a seed names the run


@pytest.mark.parametrize("backend", ["tcp", "shm"])
def test_verify_checks_every_byte_the_receiver_holds(backend, tmp_path):
    out = tmp_path / "verify.json"
    r = tb.run_verify(backend, str(out), n_random=4, echo=False)
    v = json.loads(out.read_text())["verify"]
    assert v == r["verify"] and v["match"] is True
    assert v["receiver_sha256"] == v["expected_sha256"] and v["zero_byte_writes"] >= 1
    assert r["backend_used"]["writer"]["backend"] == backend and r["all_links_requested"] is True


def test_verify_finds_a_write_that_drops_its_last_byte(monkeypatch):
    """The check is not vacuous: a plane that loses one byte of each write fails it."""
    real_plane = tb._plane

    class Lossy:
        def __init__(self, dp):
            self.dp = dp

        def __getattr__(self, name):
            return getattr(self.dp, name)

        async def write(self, src, dst, off, n, tc="bulk", **kw):
            return await self.dp.write(src, dst, off, max(0, n - 1), tc, **kw)

    monkeypatch.setattr(tb, "_plane", lambda backend, name: Lossy(real_plane(backend, name)))
    r = tb.run_verify("tcp", None, n_random=2, echo=False)  # the receiver, another process, is not patched
    assert r["verify"]["match"] is False


# -- the pieces shape and the side-by-side rounds (issue #34) --

# every shape, tiny: 1 MiB, 2 x 64 KiB, 8 x 32 KiB pieces, 3 writes per latency size, 1 round
TINY = tb.Shapes(big_bytes=1 << 20, layers=2, layer_bytes=64 << 10, pieces=8, piece_bytes=32 << 10,
                 latency_n=3, rounds=1)


@pytest.mark.parametrize("backend", ["tcp", "shm"])
def test_the_pieces_shape_lands_every_byte(backend, tmp_path):
    """The pieces as the bench sends them (all in flight, piece i from and to slot i, a random
    source), and the receiver process's whole region hashed against what they must leave."""
    if backend not in available_backends():
        pytest.skip(f"{backend} is not available on this host")
    r = tb.run_verify(backend, str(tmp_path / "pieces.json"), pieces=(24, 32 << 10), echo=False)
    v = r["verify"]
    assert v["pieces"] == [24, 32 << 10] and v["writes"] == 24 and v["bytes"] == 24 << 15
    assert v["match"] is True and v["receiver_sha256"] == v["expected_sha256"]
    assert r["backend_used"]["writer"]["backend"] == backend and r["all_links_requested"] is True


def test_pieces_past_the_region_wrap_to_their_own_slots():
    assert tb._spread(3, 4, 8) == [(0, 0, 4), (4, 4, 4), (0, 0, 4)]
    assert tb._spread(2, 16, 8) == [(0, 0, 16), (0, 0, 16)]  # larger than the room: one slot


def _check_rows(sb: dict, systems: list[str]) -> None:
    rows = {row["shape"]: row for row in sb["rows"]}
    assert list(rows) == [k for k, *_ in TINY.groups()] + [k for k, *_ in TINY.latencies()]
    assert rows["pieces_8x32768"]["label"] == "8 x 32 KB pieces" and rows["pieces_8x32768"]["unit"] == "GBps"
    assert rows["pieces_8x32768"]["bytes"] == 8 << 15
    assert {row["unit"] for row in sb["rows"]} == {"GBps", "p50_us"}
    for row in sb["rows"]:
        assert [n for n in ("dualpath", "mooncake") if n in row] == systems
        for name in systems:
            st = row[name]
            assert len(st["rounds"]) == TINY.rounds and all(x > 0 for x in st["rounds"])
            assert st["min"] <= st["median"] <= st["max"]


def test_shapes_for_dualpath_alone_say_why_mooncake_is_not_beside(tmp_path):
    out = tmp_path / "shapes.json"
    tb.run("tcp", 0.01, str(out), small=False, large=False, mooncake=False, shapes=TINY, echo=False)
    sb = json.loads(out.read_text())["shapes"]
    assert sb["rounds"] == 1 and sb["dualpath"] == "tcp (writer ran tcp)"
    _check_rows(sb, ["dualpath"])
    assert "error" in sb["mooncake"]
    table = tb.format_shapes({"shapes": sb})
    assert "8 x 32 KB pieces" in table and "Mooncake Transfer Engine not asked for" in table.splitlines()[-1]


def test_without_mooncake_the_bench_says_so_in_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(mooncake_peer, "version", lambda: None)
    out = tmp_path / "none.json"
    tb.run("tcp", 0.01, str(out), small=False, large=False, shapes=TINY, echo=False)
    sb = json.loads(out.read_text())["shapes"]
    _check_rows(sb, ["dualpath"])
    line = tb.format_shapes({"shapes": sb}).splitlines()[-1]
    assert line.startswith("Mooncake Transfer Engine not installed") and "dualpath[mooncake]" in line


@pytest.mark.skipif(mooncake_peer.version() is None,
                    reason="the Mooncake Transfer Engine is not installed (pip install 'dualpath[mooncake]')")
def test_a_side_by_side_round_with_mooncake(tmp_path):
    """One tiny round each, dualpath then Mooncake's TCP transport into a receiver process of its own;
    Mooncake's receiver finds the bytes written (the bench writes ones; the 1 MiB write is the widest)."""
    out = tmp_path / "side.json"
    tb.run("tcp", 0.01, str(out), small=False, large=False, shapes=TINY, echo=False)
    sb = json.loads(out.read_text())["shapes"]
    _check_rows(sb, ["dualpath", "mooncake"])
    assert "error" not in sb["mooncake"] and sb["mooncake"]["version"] == mooncake_peer.version()
    assert sb["mooncake"]["landed_bytes"] == TINY.big_bytes
    table = tb.format_shapes({"shapes": sb})
    assert "Mooncake TE" in table and "alternating" in table
