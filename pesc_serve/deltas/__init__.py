"""PESC deltas (routers, expert adapters, LoRA) served beside one shared base model.

``delta.py`` reads and checks a delta, ``batch.py`` says which delta owns each token of a
forward pass, ``table.py`` installs resident deltas into numbered slots of the model (and
the C++ decode step), ``registry.py`` maps served model names to deltas and keeps the
resident ones within ``--max-loaded-adapters``.
"""
