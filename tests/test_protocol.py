"""The typed control protocol: every message survives the wire, and every message has its handler."""

import msgpack
import pytest

from dualpath import protocol
from dualpath.engine.decode import DecodeEngine
from dualpath.engine.prefill import PrefillEngine
from dualpath.protocol import MESSAGES, Admit, Prefill, RunHandle, SamplingParams, from_wire
from dualpath.sched.coordinator import Coordinator

RUN = RunHandle({"backend": "tcp", "addr": ["127.0.0.1", 7001], "region": 1, "grant": 9}, offset=4096, n_blocks=3)
SAMPLES = [
    protocol.Register("pe0", "prefill", 0, "127.0.0.1", 7100), protocol.Heartbeat("de1", protocol.EngineReport(free_hbm_blocks=7)),
    protocol.Engines(),
    Admit("r.1", [1, 2, 3], 1, 1, SamplingParams(0.5, seed=42, max_tokens=16, stop_token_ids=(7,),
                                                 logit_bias=((3, -1.5),)), "pe0", 30.0),
    Prefill("r.1", [1, 2, 3], 1, 0, SamplingParams(), "de1", RUN), protocol.Load("r.1", RUN),
    protocol.Prefilled("r.1", 17), protocol.Abort("r.1"), protocol.Token("r.1", 5), protocol.Done("r.1", True),
    protocol.Failed("r.1", "a hit block was missing", retry=True, cause="failed"), protocol.LastPrefill(),
    protocol.LayerLanded("r.1", 3),
]
RECEIVERS = {"register": Coordinator, "heartbeat": Coordinator, "engines": Coordinator, "token": Coordinator,
             "done": Coordinator, "failed": Coordinator, "admit": DecodeEngine, "load": DecodeEngine,
             "prefilled": DecodeEngine, "prefill": PrefillEngine, "last_prefill": PrefillEngine,
             "layer_landed": PrefillEngine,
             "abort": (PrefillEngine, DecodeEngine)}


def test_every_message_is_sampled_and_survives_msgpack():
    assert {m.kind for m in SAMPLES} == set(MESSAGES) == set(RECEIVERS)
    for msg in SAMPLES:
        wire = msgpack.unpackb(msgpack.packb(msg.params(), use_bin_type=True), raw=False)
        assert from_wire(msg.kind, wire) == msg


def test_every_message_has_an_on_kind_handler_where_it_is_sent():
    for kind, receivers in RECEIVERS.items():
        for cls in receivers if isinstance(receivers, tuple) else (receivers,):
            assert callable(getattr(cls, f"on_{kind}", None)), f"{cls.__name__} cannot take {kind!r}"


def test_unknown_or_incomplete_messages_are_refused_by_name():
    with pytest.raises(ValueError, match="unknown message 'steal'"):
        from_wire("steal", {})
    with pytest.raises(ValueError, match="lacks field 'first_token'"):
        from_wire("prefilled", {"rid": "r.1"})


def test_a_run_handle_places_each_layer_of_a_layer_major_run():
    # layer l of a 3-block run starts 3 * l blocks in; block 2 of layer 1 is 5 blocks in
    from dualpath.engine.buffers import run_layer_offset

    assert [run_layer_offset(RUN, l, 100) for l in range(3)] == [4096, 4396, 4696]
    assert run_layer_offset(RUN, 1, 100, first_block=2) == 4096 + 500


def test_a_layer_landing_rides_a_write_as_its_notify_and_anything_else_is_refused():
    msg = protocol.LayerLanded("r.1", 3)
    assert protocol.LayerLanded.from_notify(msgpack.unpackb(msgpack.packb(msg.as_notify()), raw=False)) == msg
    for bad in [None, {"rid": "r.1", "layer": 3}, {"kind": "layer_landed", "rid": "r.1"},
                {"kind": "layer_landed", "rid": 7, "layer": 3}, {"kind": "layer_landed", "rid": "r.1", "layer": "3"}]:
        with pytest.raises(ValueError):
            protocol.LayerLanded.from_notify(bad)
