"""Flags, COGEN_* variables and config files fill the same config models, in that priority."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from cogen.core.config import CoordinatorConfig, NodeConfig
from cogen.core.settings import ConfigError, add_config_arguments, build_config


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
    config.write_text('api_port = 9000\n[network]\nswarm = "lab"\n')
    cfg = build_config(CoordinatorConfig, parse(CoordinatorConfig, ["--config", str(config)]), environ={})
    assert cfg.api_port == 9000 and cfg.network.swarm == "lab"


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
