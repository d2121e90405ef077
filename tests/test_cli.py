"""`dualpath` as a user meets it: `up` refuses what would fail later (a port in use, a store it
cannot write) before starting anything, says where the cluster serves and how to stop it, binds
the API where --host says; `--version`; and one flag name per idea (`--model`) across commands.

Every `up` runs in a process group of its own, so that a test can tell that nothing it started is
left running, and stops whatever is (SIGKILL to the group) however the test ends."""

from __future__ import annotations

import importlib.metadata
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

import dualpath
from dualpath.cli import main
from tests.test_serving import _free_port_block

REPO = Path(__file__).parent.parent


def dualpath_cli(*args: str, tmp: Path, **kw) -> subprocess.Popen:
    """`python -m dualpath.cli ARGS` in a new session (its own process group), temporary files in tmp."""
    env = {**os.environ, "TMPDIR": str(tmp)}  # the work directory `up` makes would land here
    return subprocess.Popen([sys.executable, "-m", "dualpath.cli", *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, **kw)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@contextmanager
def stopped_after(proc: subprocess.Popen) -> Iterator[subprocess.Popen]:
    """Whatever happens in the test, nothing of the process group outlives it."""
    try:
        yield proc
    finally:
        if group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextmanager
def listening(port: int) -> Iterator[socket.socket]:
    """Another server on a loopback port, as a user's forgotten one would be."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        yield s


def refused_up(tmp_path: Path, *args: str) -> str:
    """Run `dualpath up ARGS`, which must refuse to start: its stderr, once it and anything it might
    have started are gone, and nothing made in the temporary directory."""
    workdirs = tmp_path / "tmp"
    workdirs.mkdir()
    with stopped_after(dualpath_cli("up", *args, tmp=workdirs)) as p:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 2, (out, err)
        assert not group_alive(p.pid), "up left a process running"
    assert list(workdirs.iterdir()) == [], "up made a cluster work directory before refusing"
    assert "starting" not in out and "ready" not in out, out
    return err


# ---------------------------------------------------------------------------------------------- up refuses


@pytest.mark.cluster
def test_up_refuses_busy_ports_naming_each_before_starting_anything(tmp_path):
    port = _free_port_block()
    api, de1_data = port, port + 3 + 1000  # the API, and the first decode engine's data plane
    with listening(api), listening(de1_data):
        err = refused_up(tmp_path, "--port", str(port), "--store", str(tmp_path / "store"))
    assert f"port {api} (the HTTP API, --port): in use" in err, err
    assert f"port {de1_data} (de1's data port): in use" in err, err
    assert err.count(": in use") == 2, err  # the free ones are not blamed
    assert "choose another --port" in err


@pytest.mark.cluster
def test_up_refuses_the_coordinator_control_port_the_user_never_chose(tmp_path):
    """The issue's case: the API port free, --port + 1 taken (the run died 38 s later about it)."""
    port = _free_port_block()
    with listening(port + 1):
        err = refused_up(tmp_path, "--port", str(port), "--store", str(tmp_path / "store"))
    assert f"port {port + 1} (the coordinator's control port): in use" in err, err


@pytest.mark.cluster
def test_up_refuses_a_store_it_cannot_write(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    store = blocker / "store"
    err = refused_up(tmp_path, "--port", str(_free_port_block()), "--store", str(store))
    assert f"the block store {store} cannot be made: {blocker} is a file, not a directory" in err, err
    assert "give --store a directory you can write" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through any mode")
@pytest.mark.cluster
def test_up_refuses_a_store_directory_without_write_permission(tmp_path):
    store = tmp_path / "read-only"
    store.mkdir(mode=0o500)
    try:
        err = refused_up(tmp_path, "--port", str(_free_port_block()), "--store", str(store))
    finally:
        store.chmod(0o700)
    assert f"the block store {store} is not writable" in err, err


# ---------------------------------------------------------------------------------------------- up serves


@pytest.mark.cluster
def test_up_says_where_it_serves_and_how_to_stop_and_binds_the_api_where_host_says(tmp_path):
    """--host 127.0.0.2 (loopback, but not the default address): the printed base URL is there,
    /v1/models answers there and not on 127.0.0.1; SIGTERM, as printed, stops every process."""
    port = _free_port_block()
    workdirs = tmp_path / "tmp"
    workdirs.mkdir()
    args = ["up", "--port", str(port), "--store", str(tmp_path / "store"), "--host", "127.0.0.2"]
    with stopped_after(dualpath_cli(*args, tmp=workdirs)) as p:
        lines = []
        for line in p.stdout:
            lines.append(line.rstrip())
            if line.startswith("stop it"):
                break
        text = "\n".join(lines)
        base = f"http://127.0.0.2:{port}"
        assert f"API: {base}/v1   (the OpenAI base URL" in text, text
        assert f"dashboard  {base}/dashboard" in text and f"metrics    {base}/metrics" in text, text
        assert f"Ctrl-C, or `kill {p.pid}` (SIGTERM)" in text, text
        with urllib.request.urlopen(f"{base}/v1/models", timeout=10) as r:
            assert json.load(r)["data"][0]["id"] == "tiny-gqa"
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=10)
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=60) == 0
        p.stdout.read()
        assert not group_alive(p.pid), "a cluster process outlived `up`"
    assert list(workdirs.iterdir()) == [], "the work directory (and its secret) stayed"


# ---------------------------------------------------------------------------------------------- flags


def test_version_prints_the_package_version():
    r = CliRunner().invoke(main, ["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"dualpath {dualpath.__version__}"
    assert dualpath.__version__ == importlib.metadata.version("dualpath")


def _commands(group: click.Group, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, (*prefix, name))
        else:
            yield (*prefix, name), cmd


def test_every_command_names_a_model_with_model_never_preset():
    """One flag name per idea: each command that takes a model preset says --model in its --help
    (bench model and bench h2d said --preset)."""
    takes_model = []
    for path, cmd in _commands(main):
        help_text = CliRunner().invoke(main, [*path, "--help"]).output
        assert "--preset" not in help_text, path
        if any(p.name in ("preset", "presets") for p in cmd.params):
            assert "--model" in help_text, path
            takes_model.append(" ".join(path))
    assert {"bench model", "bench h2d", "up", "bench repro", "sim repro"} <= set(takes_model), takes_model


def test_the_old_preset_spelling_still_works_where_it_was(monkeypatch):
    import dualpath.bench.h2d_bench as h2d

    seen = {}

    def fake_run(**kw):
        seen.update(kw)
        return {"bytes": 1e9, "paged_h2d_GBps": 1.0, "pinned_copy_peak_GBps": 1.0, "ratio": 1.0}

    monkeypatch.setattr(h2d, "run", fake_run)
    assert CliRunner().invoke(main, ["bench", "h2d", "--preset", "tiny-mla"]).exit_code == 0
    assert seen["preset"] == "tiny-mla"
    assert CliRunner().invoke(main, ["bench", "h2d", "--model", "tiny-gqa"]).exit_code == 0
    assert seen["preset"] == "tiny-gqa"
    r = CliRunner().invoke(main, ["bench", "h2d", "--model", "tiny-gqa", "--preset", "tiny-mla"])
    assert r.exit_code == 2 and "give one" in r.output


@pytest.mark.cluster
def test_served_model_name_is_the_id_clients_send_and_metrics_name(tmp_path):
    port = _free_port_block()
    workdirs = tmp_path / "tmp"
    workdirs.mkdir()
    args = ["up", "--port", str(port), "--store", str(tmp_path / "store"), "--served-model-name", "my-model"]
    with stopped_after(dualpath_cli(*args, tmp=workdirs)) as p:
        for line in p.stdout:
            if line.startswith("stop it"):
                break
        base = f"http://127.0.0.1:{port}"
        with urllib.request.urlopen(f"{base}/v1/models", timeout=10) as r:
            assert [m["id"] for m in json.load(r)["data"]] == ["my-model"]
        with urllib.request.urlopen(f"{base}/metrics", timeout=10) as r:
            assert 'vllm:num_requests_running{model_name="my-model"}' in r.read().decode()
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=60) == 0


@pytest.mark.cluster
def test_run_refuses_an_engine_a_store_it_cannot_write(tmp_path):
    """`dualpath run` of one engine (a cluster across hosts) says so too, instead of an OSError
    traceback from the engine."""
    from dualpath.config import local_cluster, write_config

    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    cfg = local_cluster(1, 1, base_port=_free_port_block())
    cfg.store.root = str(blocker / "store")
    write_config(cfg, tmp_path / "cluster.toml")
    with stopped_after(dualpath_cli("run", "--role", "decode", "--node", "1", "--config", str(tmp_path / "cluster.toml"),
                                    tmp=tmp_path)) as p:
        out, err = p.communicate(timeout=120)
    assert p.returncode == 2 and "Traceback" not in err, err
    assert f"{blocker} is a file, not a directory (store.root in {tmp_path / 'cluster.toml'})" in err, err
