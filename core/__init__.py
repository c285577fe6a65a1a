"""The shared core: what nodes and the coordinator both need (it imports neither side).

- ``config.py``     — one frozen config model per concern; ``settings.py`` fills them from flags/env/files
- ``models.py``     — model names -> weights (SmolLM2 from GGUF, tiny, tiny-smol), 8-bit loading, LoRA,
  8-bit optimizer
- ``model_identity.py`` — a model's fingerprint, architecture and tokenizer hash (announced by nodes)
- ``corpora.py``    — the domain registry (medical, legal, code, literature, or a directory);
  ``documents.py`` — what a corpus and its documents are; ``builtin_corpora.py`` — the built-in
  domains, read from installed packages; ``directory_corpus.py`` — a local directory as a corpus
- ``data.py``       — deterministic split, sharding, the training stream and validation blocks
- ``packing.py``    — batched lazy tokenising and packing token lists into blocks
- ``checkpoint.py`` — adapter checkpoints: safetensors + JSON metadata, atomic
- ``atomic.py``     — atomic writes: a directory (staged, fsynced, renamed; leftovers of a kill removed),
  a JSON file, a symlink
- ``swarm.py``      — a peer's DHT handle with cogen's validators and typed records;
  ``compatibility.py`` — whether the swarm's (trusted) coordinator speaks this protocol
- ``access_config.py`` — who may join (``AccessConfig``, nested in ``NetworkConfig``)
- ``access.py``     — a permissioned swarm's keys, credentials and revocation list (files, signatures)
- ``authorizer.py`` — enforcing it: hivemind's token authorizer on the DHT, the member directory
- ``averagers.py``  — hivemind averagers that admit members only; the group state averager
- ``http_access.py`` — a member's signed credential header on checkpoint downloads (``--checkpoint-auth``)
- ``health.py``     — health checks and the 200/503 JSON verdict of /healthz and /readyz
- ``evaluation.py`` — validation loss; ``telemetry.py`` — logging and memory figures
- ``addresses.py``  — which host and URL a peer announces (never a wildcard, loopback only locally)
- ``periodic.py``   — a background service that repeats a task (start/stop/is_running)
- ``http_service.py`` — an HTTP server in a thread (start/stop/is_running), stdlib or uvicorn
- ``http_client.py`` — fetching a URL a peer announced: http only, no redirects, bounded time and size
- ``backoff.py``    — the one retry schedule: exponential, capped, jittered
- ``lazy.py``       — lazy re-exports, so a package's heavy modules load on first use, not on ``--help``
- ``procs.py``      — starting ``python -m cogen...`` children, waiting on conditions with deadlines
- ``netns.py``      — a test network of real hosts on one machine: namespaces on a rate-limited bridge
- ``cli_common.py`` — what every command shares: logging, signals, the grace period, exit codes;
  ``exit_codes.py`` — the numbered exit codes and the errors they stand for

cogen's packages: :mod:`cogen.protocols` (the wire), :mod:`cogen.core` (this one), :mod:`cogen.node`,
:mod:`cogen.coordinator` and :mod:`cogen.app` (the ``cogen`` command and ``cogen demo``).
"""

from cogen.protocols.version import PROTOCOL_VERSION, software_version

__version__ = software_version()
__all__ = ["PROTOCOL_VERSION", "__version__", "software_version"]
