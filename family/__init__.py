"""The family of members: the low-rank model class, the registry, and what is measured about members.

Importing `family` registers the low-rank Llama with transformers' Auto classes.
"""

from family import lowrank as _lowrank  # noqa: F401  (registers the architecture)
