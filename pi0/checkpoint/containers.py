"""The checkpoint containers pi0 reads, by name: a new container is a module that meets
`pi0.checkpoint.info.Reader` and a line here."""

from __future__ import annotations

from pi0.checkpoint import orbax, safetensors_io
from pi0.checkpoint.info import CheckpointFiles, Reader
from pi0.errors import CheckpointError

READERS: dict[str, Reader] = {"openpi_orbax": orbax, "safetensors": safetensors_io}  # tried in this order


def reader_for(files: CheckpointFiles) -> Reader:
    for reader in READERS.values():
        if reader.claims(files):
            return reader
    raise CheckpointError(f"{files.root}: no reader ({', '.join(READERS)}) can read {[s.name for s in files.shards]}")
