"""A private cluster (issue #30): what one local user can learn of another's cluster.

The block store is the cluster user's only (a block another user could read, or merely list, tells
that a prompt with its prefix was served), the API key can stay out of `ps`, and a stopped
`dualpath up` leaves no work directory holding the cluster's secret behind (docs/SECURITY.md)."""

import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from dualpath.cli import main
from dualpath.config import ConfigError, load_config
from dualpath.storage.blockfile import BlockShape
from dualpath.storage.keys import block_chain
from dualpath.storage.store import FileStore, open_store
from tests.test_serving import _free_port_block

FP = b"model-A-finger!!"
SHAPE = BlockShape(n_layers=2, bytes_per_layer=4096, dtype="float32", fingerprint=FP)
SECRET = "0123456789abcdef0123"


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask():
    """Run under a given umask, the process's own restored after."""
    saved = os.umask(0o022)
    yield os.umask
    os.umask(saved)


def write_blocks(store: FileStore, n: int) -> list[bytes]:
    keys = block_chain(list(range(64 * n)), FP, 64)
    for k in keys:
        store.write(k, [np.zeros(SHAPE.bytes_per_layer, np.uint8)] * SHAPE.n_layers)
    return keys


# ------------------------------------------------------------------------------------------ the block store

@pytest.mark.parametrize("mask", [0o022, 0o002, 0o000], ids=lambda m: f"umask-{m:03o}")
def test_store_directories_are_0700_and_blocks_0600_whatever_the_umask(tmp_path, umask, mask):
    umask(mask)
    root = tmp_path / "store"
    store = FileStore(str(root), SHAPE, 1 << 30)
    keys = write_blocks(store, 3)
    assert mode(root) == 0o700
    for k in keys:
        assert mode(os.path.dirname(store.path(k))) == 0o700
        assert mode(store.path(k)) == 0o600


async def test_the_emulated_nics_files_are_private_too(tmp_path, umask):
    astore = open_store(str(tmp_path / "store"), SHAPE, 1 << 30, read_gbps=1.0, write_gbps=1.0)
    snic = tmp_path / "store" / ".snic"
    assert mode(snic) == 0o700 and {mode(f) for f in snic.iterdir()} == {0o600}
    await astore.close()


def test_a_store_written_before_it_was_private_is_made_private_at_start(tmp_path, umask):
    """An older version wrote 0755 directories and 0644 blocks: the next start takes that access away."""
    store = FileStore(str(tmp_path), SHAPE, 1 << 30)
    keys = write_blocks(store, 2)
    for k in keys:
        os.chmod(os.path.dirname(store.path(k)), 0o755)
        os.chmod(store.path(k), 0o644)
    FileStore(str(tmp_path), SHAPE, 1 << 30)
    assert {mode(os.path.dirname(store.path(k))) for k in keys} == {0o700}
    assert {mode(store.path(k)) for k in keys} == {0o600}


# ------------------------------------------------------------------------------------------ the API key

def key_file(tmp_path: Path, file_mode: int, text: str = SECRET + "\n") -> Path:
    path = tmp_path / "api.key"
    path.write_text(text)
    os.chmod(path, file_mode)
    return path


def test_a_config_takes_the_api_key_from_a_private_file(tmp_path, monkeypatch):
    monkeypatch.setenv("DUALPATH_TOKEN", SECRET)
    monkeypatch.setenv("DUALPATH_API_KEY", "from-the-environment")
    path = key_file(tmp_path, 0o600)
    (tmp_path / "c.toml").write_text(f'[scheduler]\napi_key_file = "{path}"\n')
    assert load_config(tmp_path / "c.toml").scheduler.api_key == SECRET  # the file wins over the environment


@pytest.mark.parametrize("file_mode,text,needle", [
    (0o644, SECRET, "other users may read it"),
    (0o640, SECRET, "other users may read it"),
    (0o600, "\n", "the file is empty"),
], ids=["0644", "0640", "empty"])
def test_an_api_key_file_others_can_read_or_an_empty_one_is_refused(tmp_path, monkeypatch, file_mode, text, needle):
    monkeypatch.setenv("DUALPATH_TOKEN", SECRET)
    path = key_file(tmp_path, file_mode, text)
    (tmp_path / "c.toml").write_text(f'[scheduler]\napi_key_file = "{path}"\n')
    with pytest.raises(ConfigError, match=f"scheduler.api_key_file.*{needle}"):
        load_config(tmp_path / "c.toml")
    result = CliRunner().invoke(main, ["up", "--api-key-file", str(path), "--port", "1"])
    assert result.exit_code == 2 and needle in result.output and "--api-key-file" in result.output


def test_up_refuses_both_key_options_and_warns_of_a_key_on_the_command_line(tmp_path, monkeypatch):
    import dualpath.launcher

    seen = {}
    monkeypatch.setattr(dualpath.launcher, "launch_local", lambda **kw: seen.update(kw) or 0)
    runner = CliRunner()
    path = key_file(tmp_path, 0o600)
    both = runner.invoke(main, ["up", "--api-key", "k", "--api-key-file", str(path)])
    assert both.exit_code == 2 and "not both" in both.output
    plain = runner.invoke(main, ["up", "--api-key", "k"])
    assert plain.exit_code == 0 and "visible to every user" in plain.output and seen["api_key"] == "k"
    from_file = runner.invoke(main, ["up", "--api-key-file", str(path)], env={"DUALPATH_API_KEY": "env"})
    assert from_file.exit_code == 0 and "warning" not in from_file.output and seen["api_key_file"] == str(path)


# ------------------------------------------------------------------------------------------ `dualpath up`

class Up:
    """`dualpath up` in a session of its own, its temporary files under tmp_path/tmp; its output is
    collected line by line. SIGINT is set to Python's default in it: a shell ignores it in
    background jobs, and a child inherits that."""

    def __init__(self, tmp_path: Path, *args: str, env: dict | None = None):
        (tmp_path / "tmp").mkdir(exist_ok=True)
        self.port = _free_port_block()
        code = ("import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
                "from dualpath.cli import main; main()")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, "up", "--prefill", "1", "--decode", "1", "--port", str(self.port),
             "--store", str(tmp_path / "store"), *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
            env={**os.environ, "TMPDIR": str(tmp_path / "tmp"), **(env or {})})
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self.reader.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_for_line(self, prefix: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout  # a bound on a hang, not a measurement
        while not any(line.startswith(prefix) for line in self.lines):
            assert self.proc.poll() is None and time.monotonic() < deadline, "".join(self.lines)[-3000:]
            time.sleep(0.1)

    def finish(self, timeout: float = 180) -> str:
        """Wait for it to exit (killing its whole session past the timeout); all it printed."""
        try:
            self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.reader.join(10)
        return "".join(self.lines)


def one_token(url: str, api_key: str) -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    req = urllib.request.Request(url + "/v1/completions", data=b'{"prompt": [1, 2], "max_tokens": 1}', headers=headers)
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.load(r)


def work_dirs(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "tmp").glob("dualpath-*"))


@pytest.mark.parametrize("how", ["SIGTERM", "Ctrl-C"])
@pytest.mark.cluster
def test_a_stopped_cluster_leaves_no_work_directory_with_its_secret(tmp_path, how):
    """Started with its API key in a file (or in the environment), the API refuses a request without
    the key and serves one with it; stopped, the cluster's work directory (its config, holding the
    secret, and its logs) is gone."""
    if how == "SIGTERM":
        up = Up(tmp_path, "--api-key-file", str(key_file(tmp_path, 0o600)))
    else:
        up = Up(tmp_path, env={"DUALPATH_API_KEY": SECRET})
    try:
        up.wait_for_line("API:")
        with pytest.raises(urllib.error.HTTPError) as refused:
            one_token(up.url, "")
        assert refused.value.code == 401
        assert len(one_token(up.url, SECRET)["choices"][0]["token_ids"]) == 1
        (work,) = work_dirs(tmp_path)
        assert (work / "cluster.toml").exists()  # while it runs, as engines restarted after a crash need it
    finally:
        if how == "SIGTERM":  # a service manager's stop: to `up` alone
            os.kill(up.proc.pid, signal.SIGTERM)
        else:  # the terminal sends SIGINT to the whole foreground process group
            os.killpg(up.proc.pid, signal.SIGINT)
        out = up.finish()
    assert up.proc.returncode == 0, out[-3000:]
    assert "stopping the cluster" in out and work_dirs(tmp_path) == [], out[-3000:]


@pytest.mark.cluster
def test_the_demo_uses_an_api_key_file_and_the_config_out_copy_is_kept(tmp_path):
    path = key_file(tmp_path, 0o600)
    out_cfg = tmp_path / "kept.toml"
    up = Up(tmp_path, "--demo", "--api-key-file", str(path), "--config-out", str(out_cfg))
    out = up.finish(timeout=300)
    assert up.proc.returncode == 0 and "turn 4:" in out, out[-3000:]  # the demo's requests carried the key
    assert work_dirs(tmp_path) == [] and mode(out_cfg) == 0o600
    text = out_cfg.read_text()
    assert str(path) in text and SECRET not in text  # the kept config names the key's file, not the key


@pytest.mark.cluster
def test_a_failed_cluster_keeps_its_logs_but_not_its_secret(tmp_path):
    """Every process of the cluster fails as it starts (a bad $DUALPATH_SWITCH_INTERVAL_S, which
    each reads first; `up` refuses a taken port before starting anything, so that no longer serves).
    The logs say why; the secret is gone."""
    port = _free_port_block()
    (tmp_path / "tmp").mkdir()
    code = "from dualpath.cli import main; main()"
    proc = subprocess.run([sys.executable, "-c", code, "up", "--prefill", "1", "--decode", "1", "--port", str(port),
                           "--store", str(tmp_path / "store")], capture_output=True, text=True, timeout=180,
                          env={**os.environ, "TMPDIR": str(tmp_path / "tmp"), "DUALPATH_SWITCH_INTERVAL_S": "bad"})
    assert proc.returncode == 1 and "exited with code 1" in proc.stderr, proc.stdout + proc.stderr
    (work,) = work_dirs(tmp_path)
    assert (work / "coordinator.log").exists() and not (work / "cluster.toml").exists()
    assert mode(work) == 0o700
