"""cogen: a swarm trains 8-bit domain experts over hivemind and fuses them, generation after generation.

The shared core (this package) holds what nodes and the coordinator both need:

- ``config.py``     — one frozen config model per concern; ``settings.py`` fills them from flags/env/files
- ``models.py``     — model names -> weights (SmolLM2 from GGUF, tiny), 8-bit loading, LoRA, 8-bit optimizer
- ``corpora.py``    — the domain registry (medical, legal, code, literature, or a directory)
- ``data.py``       — deterministic split, sharding, tokenising and packing into blocks
- ``checkpoint.py`` — adapter checkpoints: safetensors + JSON metadata, atomic
- ``swarm.py``      — a peer's DHT handle with cogen's validators and typed records
- ``health.py``     — health checks and the 200/503 JSON verdict of /healthz and /readyz
- ``evaluation.py`` — validation loss; ``telemetry.py`` — logging and memory figures
- ``demo.py``       — ``cogen demo``; ``cli.py`` — the ``cogen`` command

Sub-packages: :mod:`cogen.protocols` (the wire), :mod:`cogen.node`, :mod:`cogen.coordinator`.
"""

from cogen.protocols.version import PROTOCOL_VERSION, software_version

__version__ = software_version()
__all__ = ["PROTOCOL_VERSION", "__version__", "software_version"]
