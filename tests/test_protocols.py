"""Records accept good input and reject bad input; signatures are enforced on a real DHT.

(A little over 300 lines: every record kind's bounds and refusals are checked here, side by side.)
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
from hivemind.utils import MSGPackSerializer, get_dht_time

from cogen.core.compatibility import check_compatible
from cogen.core.config import NetworkConfig
from cogen.core.swarm import SwarmClient
from cogen.protocols import (
    PROTOCOL_VERSION,
    RECORD_SCHEMAS,
    CheckpointSource,
    GroupProgress,
    Hardware,
    MemberInfo,
    NodeInfo,
    Record,
    Revocations,
    ShardClaim,
    SwarmInfo,
    TrainingProgress,
    check_swarm_name,
    swarm_key,
)
from cogen.protocols.keys import delta_prefix, foreign_group_prefix, group_prefix, state_prefix
from cogen.protocols.manifest import signs_owner
from cogen.protocols.names import is_name, slug
from cogen.protocols.records import MAX_CLOCK_SKEW_S, MAX_COUNT, MAX_GENERATION, MAX_TIME, from_the_future
from cogen.protocols.validation import RecordRejected, check_record, parse_record

PEER = "12D3KooWGdMLJpgWr9AtogxkNPTRuP3WN2fdpN7Tmknw3J36TJfd"
OWNER = b"[owner:ssh-rsa AAAAB3NzaC1yc2E]"


def hardware() -> Hardware:
    return Hardware(
        device="cpu",
        device_name="test cpu",
        memory_bytes=2**34,
        cpu_count=2,
        supports_bf16=True,
        supports_fp16=True,
        supports_int8=True,
    )


def node_info(**overrides: Any) -> dict[str, Any]:
    info = NodeInfo(
        peer_id=PEER,
        expert="medical",
        hardware=hardware(),
        software_version="0.1.0",
        model="tiny",
        precision="int8",
        shard=3,
        num_shards=16,
        state="training",
        started_at=1.0,
        updated_at=2.0,
    )
    return {**info.to_wire(), **overrides}


def progress(**overrides: Any) -> dict[str, Any]:
    rec = TrainingProgress(
        peer_id=PEER,
        expert="medical",
        step=10,
        samples=40,
        tokens=5120,
        loss=2.5,
        samples_per_second=3.0,
        peak_memory_bytes=10**9,
        time=100.0,
    )
    return {**rec.to_wire(), **overrides}


def test_good_records_round_trip_through_msgpack() -> None:
    for kind, payload in (("nodes", node_info()), ("progress", progress())):
        wire = MSGPackSerializer.dumps(payload)
        record = check_record(kind, OWNER, wire)
        assert record is not None and record.to_wire() == payload
        assert record.protocol_version == PROTOCOL_VERSION


def test_progress_without_memory_fields_is_still_valid() -> None:
    """Records of nodes that report no RSS / GPU memory (the fields came later) keep validating."""
    old = progress()
    del old["rss_bytes"], old["gpu_memory_bytes"]
    record = check_record("progress", OWNER, MSGPackSerializer.dumps(old))
    assert (
        isinstance(record, TrainingProgress) and record.rss_bytes is None and record.gpu_memory_bytes is None
    )
    new = check_record(
        "progress", OWNER, MSGPackSerializer.dumps(progress(rss_bytes=2**28, gpu_memory_bytes=0))
    )
    assert isinstance(new, TrainingProgress) and new.rss_bytes == 2**28
    with pytest.raises(RecordRejected, match="rss_bytes"):
        check_record("progress", OWNER, MSGPackSerializer.dumps(progress(rss_bytes=-1)))


def checkpoint(**overrides: Any) -> dict[str, Any]:
    rec = CheckpointSource(
        peer_id=PEER, generation=3, manifest_sha256="a" * 64, url="http://10.0.0.1:1/g/", time=1.0
    )
    return {**rec.to_wire(), **overrides}


def swarm_info(**overrides: Any) -> dict[str, Any]:
    rec = SwarmInfo(
        swarm="s", coordinator_peer_id=PEER, software_version="0.1.0", started_at=1.0, updated_at=2.0
    )
    return {**rec.to_wire(), **overrides}


def group(**overrides: Any) -> dict[str, Any]:
    rec = GroupProgress(
        peer_id=PEER,
        expert="code",
        outer_step=2,
        inner_steps=1,
        compression="none",
        rounds_ok=0,
        rounds_failed=0,
    )
    return {**rec.to_wire(), **overrides}


@pytest.mark.parametrize(
    ("kind", "payload", "complaint"),
    [
        ("checkpoints", checkpoint(generation=MAX_GENERATION + 1), "generation"),
        ("checkpoints", checkpoint(generation=0), "generation"),
        ("checkpoints", checkpoint(time=MAX_TIME * 10), "time"),  # the year 100000: garbage, not a skew
        ("checkpoints", checkpoint(url="http://x/" + "a" * 300), "url"),
        ("checkpoints", checkpoint(url="file:///etc/"), "url"),
        ("progress", progress(tokens=MAX_COUNT + 1), "tokens"),
        ("nodes", node_info(updated_at=MAX_TIME + 1), "updated_at"),
        ("groups", group(outer_step=2**60), "outer_step"),
        ("swarm", swarm_info(owner_signature="A" * 2000), "owner_signature"),
    ],
)
def test_out_of_bounds_records_are_rejected(kind: str, payload: Any, complaint: str) -> None:
    with pytest.raises(RecordRejected, match=complaint):
        check_record(kind, OWNER, MSGPackSerializer.dumps(payload))
    assert from_the_future(get_dht_time() + MAX_CLOCK_SKEW_S + 1, get_dht_time())
    assert not from_the_future(get_dht_time() + 1, get_dht_time())


def test_only_the_manifest_key_can_name_the_owner_that_speaks_for_it(tmp_path: Any) -> None:
    from cogen.coordinator.merging import Identity

    key = Identity.load_or_create(tmp_path / "id.pem")
    other = Identity.load_or_create(tmp_path / "other.pem")
    signature = key.sign_owner("s", OWNER)
    assert signs_owner(key.public_key, signature, "s", OWNER)
    assert not signs_owner(key.public_key, signature, "s", b"[owner:ssh-rsa AAAAB3other]")  # replayed
    assert not signs_owner(key.public_key, signature, "t", OWNER)  # another swarm
    assert not signs_owner(other.public_key, signature, "s", OWNER)  # someone else's key copied in
    assert not signs_owner(key.public_key, None, "s", OWNER)
    assert not signs_owner(key.public_key, "not base64!", "s", OWNER)
    assert not signs_owner("ssh-rsa garbage", signature, "s", OWNER)


@pytest.mark.parametrize(
    ("kind", "payload", "complaint"),
    [
        ("progress", progress(step="10"), "step"),  # a string where an int belongs: no coercion
        ("progress", progress(step=-1), "step"),
        ("progress", progress(samples_per_second=math.inf), "samples_per_second"),
        ("progress", progress(samples_per_second=True), "samples_per_second"),
        ("progress", progress(expert="Bad Name!"), "expert"),
        ("progress", {k: v for k, v in progress().items() if k != "loss"}, "loss"),  # missing field
        ("progress", progress(extra_field=1), "extra_field"),
        ("nodes", node_info(peer_id="not a peer id"), "peer_id"),
        ("nodes", node_info(state="dancing"), "state"),
        ("nodes", node_info(hardware={"device": "cpu"}), "hardware"),
        ("nodes", node_info(precision="int4"), "precision"),
        ("nodes", [1, 2, 3], "not a dict"),
    ],
)
def test_bad_records_are_rejected_with_a_reason(kind: str, payload: Any, complaint: str) -> None:
    with pytest.raises(RecordRejected, match=complaint):
        check_record(kind, OWNER, MSGPackSerializer.dumps(payload))


def test_nan_loss_is_reported_not_hidden() -> None:
    record = parse_record("progress", progress(loss=math.nan))
    assert isinstance(record, TrainingProgress) and math.isnan(record.loss)


def test_unsigned_and_undecodable_records_are_rejected() -> None:
    wire = MSGPackSerializer.dumps(progress())
    with pytest.raises(RecordRejected, match="owner"):
        check_record("progress", MSGPackSerializer.dumps(b"anyone"), wire)
    with pytest.raises(RecordRejected, match="msgpack"):
        check_record("progress", OWNER, b"\xc1\xc1\xc1")


def test_other_protocol_versions_are_refused_with_a_clear_message() -> None:
    with pytest.raises(RecordRejected, match=f"protocol {PROTOCOL_VERSION + 1}.*speaks {PROTOCOL_VERSION}"):
        parse_record("progress", progress(protocol_version=PROTOCOL_VERSION + 1))
    # the swarm announcement keeps its envelope so that joiners can explain the mismatch
    assert check_record("swarm", OWNER, MSGPackSerializer.dumps({"protocol_version": 99})) is None


def test_swarm_keys_are_prefixed_and_names_checked() -> None:
    assert swarm_key("lab-1", "progress") == "lab-1_progress"
    with pytest.raises(ValueError, match="invalid swarm name"):
        swarm_key("Bad Swarm", "progress")
    with pytest.raises(ValueError, match="unknown record kind"):
        swarm_key("lab", "secrets")


def test_each_record_class_names_its_kind_and_each_key_format_is_written_once() -> None:
    assert {
        "nodes": NodeInfo, "progress": TrainingProgress, "swarm": SwarmInfo, "shards": ShardClaim,
        "groups": GroupProgress, "checkpoints": CheckpointSource, "members": MemberInfo,
        "revocations": Revocations,
    } == RECORD_SCHEMAS  # fmt: skip
    assert all(kind == cls.KIND for kind, cls in RECORD_SCHEMAS.items())
    assert swarm_key("lab-1", TrainingProgress.KIND) == "lab-1_progress"
    group = group_prefix("lab-1", "medical", 3)
    assert (group, delta_prefix(group), state_prefix(group)) == (
        "lab-1_medical_g3", "lab-1_medical_g3_delta", "lab-1_medical_g3_state",
    )  # fmt: skip
    with pytest.raises(ValueError, match="invalid expert name"):
        group_prefix("lab-1", "Medical!", 3)
    # a group on a foreign model: its own prefix, never one of the swarm's generations
    sha = "ab" * 32
    assert foreign_group_prefix("lab-1", "legal", sha) == "lab-1_legal_mabababababababab"
    for bad in ("AB" * 32, "ab" * 31, "zz" * 32):
        with pytest.raises(ValueError, match="sha256 in hex"):
            foreign_group_prefix("lab-1", "legal", bad)


def test_a_node_announces_its_model_by_fingerprint_and_a_bad_one_is_refused() -> None:
    info = NodeInfo.model_validate(node_info(model_sha256="0f" * 32, architecture="LlamaForCausalLM",
                                             tokenizer_sha256="1e" * 32))  # fmt: skip
    assert info.model_sha256 == "0f" * 32 and info.architecture == "LlamaForCausalLM"
    assert NodeInfo.model_validate(node_info()).model_sha256 is None  # an older node's record still reads
    for field, value in (("model_sha256", "0F" * 32), ("tokenizer_sha256", "x"), ("architecture", "A" * 129)):
        with pytest.raises(ValueError):
            NodeInfo.model_validate(node_info(**{field: value}))


@pytest.mark.parametrize(
    ("name", "ok"),
    [("medical", True), ("a", True), ("x" * 64, True), ("0-code_2", True), ("x" * 65, False),
     ("-lead", False), ("_lead", False), ("Upper", False), ("sp ace", False), ("", False),
     ("trailing\n", False)],
)  # fmt: skip
def test_one_rule_for_swarm_and_expert_names(name: str, ok: bool) -> None:
    """The same rule holds in the name check, the record schemas and the key builder."""
    assert is_name(name) is ok
    record_ok = True
    try:
        parse_record("progress", progress(expert=name))
    except RecordRejected:
        record_ok = False
    assert record_ok is ok
    if ok:
        assert check_swarm_name(name) == name
    else:
        with pytest.raises(ValueError, match="invalid swarm name"):
            check_swarm_name(name)
    assert is_name(slug(name, "custom"))


def test_a_free_text_becomes_a_name() -> None:
    assert slug("My Notes (2024)", "custom") == "my-notes-2024"
    assert slug("???", "custom") == "custom"
    assert len(slug("a" * 100, "custom")) == 64


@pytest.fixture(scope="module")
def two_peers() -> Iterator[tuple[SwarmClient, SwarmClient]]:
    first = SwarmClient(NetworkConfig(swarm="unit", host="127.0.0.1"))
    second = SwarmClient(
        NetworkConfig(swarm="unit", host="127.0.0.1", initial_peers=tuple(first.visible_maddrs()))
    )
    try:
        yield first, second
    finally:
        second.shutdown()
        first.shutdown()


def test_signed_records_travel_between_real_peers(two_peers: tuple[SwarmClient, SwarmClient]) -> None:
    first, second = two_peers
    record = parse_record("progress", progress())
    assert first.publish(record).result() is True
    entries = second.fetch(TrainingProgress)
    assert [(e.owner, e.record) for e in entries] == [(first.owner, record)]
    check_compatible(second)  # no announcement yet: nothing to refuse


def test_forged_and_malformed_records_are_not_stored(two_peers: tuple[SwarmClient, SwarmClient]) -> None:
    first, second = two_peers
    key, expiry = swarm_key("unit", NodeInfo.KIND), get_dht_time() + 30
    # second writes under first's public key: it cannot sign for it, so no peer accepts it
    assert second.dht.store(key, node_info(), expiry, subkey=first.owner) is False
    # second writes a malformed record under its own key: signed, but the schema check refuses it
    assert second.dht.store(key, node_info(shard="3"), expiry, subkey=second.owner) is False
    assert first.fetch(NodeInfo) == [] and second.fetch(NodeInfo) == []
    # a well-formed one is accepted
    info = parse_record("nodes", node_info())
    assert second.publish(info).result() is True
    assert [e.owner for e in first.fetch(NodeInfo)] == [second.owner]


def test_publish_checks_the_record_type(two_peers: tuple[SwarmClient, SwarmClient]) -> None:
    """A record's kind (its key) comes from its class: what is not a record of a kind is not published."""

    class Unkeyed(Record):
        note: str

    for value in (hardware(), Unkeyed(note="x")):
        with pytest.raises(TypeError, match=f"{type(value).__name__} is not a record of any kind"):
            two_peers[0].publish(value)  # type: ignore[arg-type]
