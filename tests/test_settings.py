"""Flags, COGEN_* variables and config files fill the same config models, in that priority."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from cogen.coordinator.config import CoordinatorConfig, MergeConfig
from cogen.core.config import NodeConfig
from cogen.core.settings import ConfigError, add_config_arguments, build_config, settings_of, write_config


def parse(cls: type, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, cls)
    return parser.parse_args(argv)


def test_defaults_file_env_and_flags_in_priority_order(tmp_path: Path) -> None:
    config = tmp_path / "node.json"
    config.write_text(json.dumps({"model": {"lora_rank": 4, "precision": "bf16"}, "data": {"batch_size": 3}}))
    env = {
        "COGEN_LORA_RANK": "8",
        "COGEN_INITIAL_PEERS": "/ip4/1.2.3.4/tcp/1/p2p/A, /ip4/1.2.3.4/tcp/2/p2p/B",
    }
    args = parse(NodeConfig, ["--config", str(config), "--lora-rank", "32", "--no-gradient-checkpointing"])
    cfg = build_config(NodeConfig, args, environ=env)
    assert cfg.model.lora_rank == 32  # flag beats env beats file
    assert cfg.model.precision == "bf16"  # from the file
    assert cfg.data.batch_size == 3
    assert cfg.network.initial_peers == ("/ip4/1.2.3.4/tcp/1/p2p/A", "/ip4/1.2.3.4/tcp/2/p2p/B")
    assert cfg.model.gradient_checkpointing is False
    assert cfg.optim.lr == NodeConfig().optim.lr  # untouched default


def test_toml_config_file(tmp_path: Path) -> None:
    config = tmp_path / "coord.toml"
    config.write_text('[api]\napi_port = 9000\n[network]\nswarm = "lab"\n[merge]\nmethod = "ties"\n')
    cfg = build_config(CoordinatorConfig, parse(CoordinatorConfig, ["--config", str(config)]), environ={})
    assert cfg.api.api_port == 9000 and cfg.network.swarm == "lab" and cfg.merge.method == "ties"


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--lr", "-1"], {}, "--lr: Input should be greater than 0"),
        ([], {"COGEN_BATCH_SIZE": "many"}, "COGEN_BATCH_SIZE='many'"),
        (["--swarm", "No Spaces"], {}, "--swarm"),
        (["--expert", "/no/such/dir"], {}, "neither a domain name nor an existing directory"),
    ],
)
def test_bad_settings_give_one_line(argv: list[str], env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_config(NodeConfig, parse(NodeConfig, argv), environ=env)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_bad_config_file(tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        build_config(NodeConfig, parse(NodeConfig, ["--config", str(broken)]), environ={})
    with pytest.raises(ConfigError, match="cannot read config file"):
        build_config(NodeConfig, parse(NodeConfig, ["--config", str(tmp_path / "missing.json")]), environ={})


def test_every_field_has_exactly_one_flag_and_help() -> None:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, NodeConfig)
    help_text = parser.format_help()
    for flag in ("--lora-rank", "--precision", "--initial-peers", "--max-steps", "--expert", "--optimizer"):
        assert flag in help_text
    assert "COGEN_LORA_RANK" in help_text


def test_a_flag_prefix_names_a_nested_models_flags_where_it_is_nested() -> None:
    """The coordinator's merge options are --merge-*, the offline merge's the bare names; same model."""
    coordinator = {s.name: s.path for s in settings_of(CoordinatorConfig)}
    offline = {s.name: s.path for s in settings_of(MergeConfig)}
    for option in ("method", "density", "seed", "majority_sign", "rank_bootstrap"):
        assert coordinator[f"merge_{option}"] == ("merge", option) == offline[option]
        assert option not in coordinator and f"merge_{option}" not in offline
    flat = [
        "--merge-method", "ties", "--merge-density", "0.3", "--merge-seed", "7", "--merge-majority-sign",
        "frequency", "--merge-rank-bootstrap", "0", "--api-port", "9001", "--eval-blocks", "3",
        "--no-mixture", "--identity", "key.pem", "--cache-dir", "cache", "--generation-outer-steps", "4",
    ]  # fmt: skip
    env = {"COGEN_MERGE_SEED": "3", "COGEN_POLL_INTERVAL_S": "0.5", "COGEN_KEEP_HISTORY": "false"}
    cfg = build_config(CoordinatorConfig, parse(CoordinatorConfig, flat), environ=env)
    assert (cfg.merge.method, cfg.merge.density, cfg.merge.seed) == ("ties", 0.3, 7)  # the flag beats env
    assert (cfg.merge.majority_sign, cfg.merge.rank_bootstrap) == ("frequency", 0)
    assert (cfg.api.api_port, cfg.eval.eval_blocks, cfg.moe.mixture) == (9001, 3, False)
    assert (cfg.keys.identity, cfg.cache.cache_dir) == (Path("key.pem"), Path("cache"))
    assert (cfg.view.poll_interval_s, cfg.history.keep_history, cfg.schedule.generation_outer_steps) == (
        0.5, False, 4
    )  # fmt: skip
    offline = build_config(
        MergeConfig,
        parse(
            MergeConfig, ["--experts", "a", "--method", "dare", "--seed", "5", "--majority-sign", "frequency"]
        ),
        environ={"COGEN_RANK_BOOTSTRAP": "10"},
    )
    assert (offline.merge.method, offline.merge.seed, offline.merge.rank_bootstrap) == ("dare", 5, 10)
    assert offline.merge.majority_sign == "frequency"
    with pytest.raises(SystemExit):  # the offline merge has no --merge-method
        parse(MergeConfig, ["--merge-method", "ties"])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[merge]\nmethod = "ties"\nstrength = 2\n', "unknown setting 'merge.strength'"),
        ('merge_method = "ties"\n', "unknown setting 'merge_method' (it is [merge] method)"),
        ('merge = "ties"\n', "merge: Input should be a valid dictionary"),
        ("[api]\napi_port = -1\n", "--api-port: Input should be greater than or equal to 0"),
    ],
)
def test_bad_nested_config_file_keys_give_one_line(tmp_path: Path, text: str, message: str) -> None:
    config = tmp_path / "coordinator.toml"
    config.write_text(text)
    with pytest.raises(ConfigError) as info:
        build_config(CoordinatorConfig, parse(CoordinatorConfig, ["--config", str(config)]), environ={})
    assert message in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_a_flag_into_a_table_the_file_gave_as_a_value_is_one_line(tmp_path: Path) -> None:
    config = tmp_path / "coordinator.json"
    config.write_text(json.dumps({"merge": "ties"}))
    args = parse(CoordinatorConfig, ["--config", str(config), "--merge-method", "dare"])
    with pytest.raises(ConfigError, match=r"^merge: a config file must give a table of settings here$"):
        build_config(CoordinatorConfig, args, environ={})


def test_a_written_config_reads_back_as_the_same_model(tmp_path: Path) -> None:
    cfg = build_config(
        CoordinatorConfig,
        environ={},
        merge_method="ties",
        api_port=0,
        swarm="lab",
        identity=tmp_path / "k.pem",
    )
    path = write_config(tmp_path / "coordinator.json", cfg)
    assert json.loads(path.read_text())["merge"] == {"method": "ties"}  # nested, defaults left out
    assert (
        build_config(CoordinatorConfig, parse(CoordinatorConfig, ["--config", str(path)]), environ={}) == cfg
    )
    assert not list(tmp_path.glob(".coordinator.json-*"))  # written through a temp file and a rename
