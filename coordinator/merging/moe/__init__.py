"""``moe``: the experts' LoRA adapters side by side behind a learned per-sequence router.

Weight merges (``linear``, ``ties``, ``dare``) fold every expert into one dense delta and lose part of
each expert on its own domain. The routed mixture keeps them apart: one PEFT model holds the base and
every expert's adapter under its label, and a small router picks, for each sequence, the adapter of
the domain the sequence looks like (in the spirit of Branch-Train-MiX, at sequence level).

The router is a linear gate (multinomial logistic regression, trained with torch) over the base
model's input embeddings and last hidden state (adapters off), each mean-pooled over a sequence's
first ``route_tokens`` tokens and standardised with the training set's mean and spread. It learns
from windows of each domain's *training* split (:func:`training_blocks`), never its validation
blocks. A choice made from a sequence's own tokens scores them with foreknowledge, but little: the
causal, equal-prior Bayesian mixture of the same ``E`` experts is at most ``log E`` nats per sequence
worse than the best single expert, so the advantage is at most ``log(E) / T`` nats per token of a
``T``-token sequence (0.009 for 3 experts and 128 tokens), whatever ``route_tokens`` is.

PEFT's X-LoRA (a learned per-token soft gate) was tried first, on CPU with PEFT 0.21: it loads the
experts only when they are named ``"0"``, ``"1"``, ... (other names fail with a ``KeyError`` in
``disable_adapter_layers``), its gate is trained through the language-model loss of two full passes
per step, and every token runs every adapter; the per-sequence gate here needs only base forward
passes on a few hundred windows to train and runs one adapter per sequence.

A mixture directory is self-contained, every file hashed in ``mixture.json``::

    mixture.json                      (MixtureSpec: experts by label and adapter sha256, file hashes)
    router.safetensors                (weight [E, 2H], bias [E], mean [2H], std [2H]; H: hidden size;
                                       an Arrow mixture has none: its spec names top_k and temperature)
    experts/<label>/adapter_model.safetensors, adapter_config.json, cogen.json

Beside the trained router, PEFT's Arrow routes every token in every layer with no training at all
(``arrow.py``; ``--mixture-routing arrow``); ``bench/merging/quality.py`` measures both.

The package, by concern:

- ``spec.py``     — the on-disk format (:class:`MixtureSpec`, file names) and :class:`MixtureError`
- ``router.py``   — :class:`Router` (the linear gate) and :func:`sequence_features`
- ``arrow.py``    — :class:`ArrowMixture`, :func:`build_arrow` (PEFT's zero-shot per-token router)
- ``training.py`` — :func:`training_blocks` and :func:`train_router`
- ``mixture.py``  — :class:`RoutedMixture`, :func:`build_mixture`, :func:`route` / :class:`RoutingReport`
- ``store.py``    — :func:`save_mixture`, :func:`read_spec`, :func:`load_mixture` (atomic, verified)
"""

from cogen.coordinator.merging.moe.arrow import ARROW, ArrowMixture, ArrowOptions, build_arrow
from cogen.coordinator.merging.moe.mixture import RoutedMixture, RoutingReport, build_mixture, route
from cogen.coordinator.merging.moe.router import Router, sequence_features
from cogen.coordinator.merging.moe.spec import NAME, ROUTER_FILE, SPEC_FILE, MixtureError, MixtureSpec
from cogen.coordinator.merging.moe.store import load_mixture, read_spec, save_mixture
from cogen.coordinator.merging.moe.training import train_router, training_blocks

__all__ = [
    "ARROW",
    "NAME",
    "ROUTER_FILE",
    "SPEC_FILE",
    "ArrowMixture",
    "ArrowOptions",
    "MixtureError",
    "MixtureSpec",
    "RoutedMixture",
    "Router",
    "RoutingReport",
    "build_arrow",
    "build_mixture",
    "load_mixture",
    "read_spec",
    "route",
    "save_mixture",
    "sequence_features",
    "train_router",
    "training_blocks",
]
