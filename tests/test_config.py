"""Configs: TOML round trip, and errors that name the bad field and value."""

import pytest

import os
import stat

from dualpath.config import ConfigError, dump_config, load_config, local_cluster, write_config

SECRET = "0123456789abcdef0123"


def test_local_cluster_round_trips_through_toml(tmp_path):
    cfg = local_cluster(1, 2, **{"store.snic_read_gbps": 1.5, "scheduler.policy": "pe-read"})
    path = tmp_path / "c.toml"
    path.write_text(dump_config(cfg))
    back = load_config(path)
    assert back == cfg
    assert [e.name for e in back.engines] == ["pe0", "de1", "de2"]


@pytest.mark.parametrize("text,needle", [
    ('[store]\nsnic_read_gbps = -1\n', "store.snic_read_gbps"),
    ('[scheduler]\npolicy = "fastest"\n', "'fastest'"),
    ('[model]\npreset = "huge"\n', "model.preset"),
    ('[engine]\nhbm_blocks = "many"\n', "engine.hbm_blocks"),
    ('[store]\nbogus = 1\n', "store.bogus"),
    ('[[engines]]\nrole = "router"\n', "engines[0].role"),
    ('[transport]\nbackend = "carrier-pigeon"\n', "transport.backend"),
    ("[store\n", "not valid TOML"),
])
def test_bad_config_names_the_field(tmp_path, monkeypatch, text, needle):
    monkeypatch.setenv("DUALPATH_TOKEN", SECRET)
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        load_config(path)


def test_every_local_cluster_has_its_own_secret_and_its_file_is_private(tmp_path):
    a, b = local_cluster(1, 1), local_cluster(1, 1)
    assert a.transport.token != b.transport.token and len(a.transport.token) >= 16
    write_config(a, tmp_path / "c.toml")
    assert stat.S_IMODE(os.stat(tmp_path / "c.toml").st_mode) == 0o600
    assert load_config(tmp_path / "c.toml").transport.token == a.transport.token


@pytest.mark.parametrize("transport,env,needle", [
    ("", None, "secret is not set"),
    ('token = "dualpath-local"', None, "old fixed default"),
    ('token = "short"', None, "too short"),
    ("", "dualpath-local", "old fixed default"),
    ('token_file = "/nonexistent/secret"', None, "transport.token_file"),
])
def test_a_config_without_a_real_secret_is_refused(tmp_path, monkeypatch, transport, env, needle):
    monkeypatch.delenv("DUALPATH_TOKEN", raising=False)
    if env:
        monkeypatch.setenv("DUALPATH_TOKEN", env)
    path = tmp_path / "c.toml"
    path.write_text(f"[transport]\n{transport}\n")
    with pytest.raises(ConfigError, match=needle):
        load_config(path)


def test_the_secret_comes_from_the_config_a_file_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("DUALPATH_TOKEN", raising=False)
    (tmp_path / "secret").write_text(SECRET + "\n")
    (tmp_path / "a.toml").write_text(f'[transport]\ntoken_file = "{tmp_path / "secret"}"\n')
    assert load_config(tmp_path / "a.toml").transport.token == SECRET
    monkeypatch.setenv("DUALPATH_TOKEN", SECRET[::-1])
    (tmp_path / "b.toml").write_text("")
    assert load_config(tmp_path / "b.toml").transport.token == SECRET[::-1]
    (tmp_path / "c.toml").write_text(f'[transport]\ntoken = "{SECRET}"\n')  # the file wins over the environment
    assert load_config(tmp_path / "c.toml").transport.token == SECRET


def test_cli_help_lists_subcommands():
    from click.testing import CliRunner

    from dualpath.cli import main

    out = CliRunner().invoke(main, ["--help"]).output
    for sub in ("run", "up", "bench"):
        assert sub in out
