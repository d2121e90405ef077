"""Configs: TOML round trip, and errors that name the bad field and value."""

import pytest

from dualpath.config import ConfigError, dump_config, load_config, local_cluster


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
def test_bad_config_names_the_field(tmp_path, text, needle):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        load_config(path)


def test_cli_help_lists_subcommands():
    from click.testing import CliRunner

    from dualpath.cli import main

    out = CliRunner().invoke(main, ["--help"]).output
    for sub in ("run", "up", "bench"):
        assert sub in out
