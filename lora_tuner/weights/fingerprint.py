"""A cheap, stable identity of a checkpoint folder's weights. run.json pins the base a run trained on and the adapter it
started from by path and fingerprint, so merge, eval and export use exactly those, and refuse when the files there
have changed since (another model saved over the folder, a retrained start adapter).

The fingerprint hashes config.json, adapter_config.json and every .safetensors file's name and size; files up to
WHOLE bytes whole (an adapter always is), larger ones by their header (every tensor's name, dtype, shape and place)
and SAMPLES evenly spaced blocks of their data. Hashing a 7B base whole would read 13.5 GB at every merge (as long as
the merge itself); the samples read a few MB and tell apart any other checkpoint (another fine-tune, dtype or size),
and a single edited weight only when it falls in a sampled block."""
import hashlib
import struct
from pathlib import Path

WHOLE = 64 * 2**20
SAMPLES, BLOCK = 64, 64 * 2**10
MAX_HEADER = 100 * 2**20  # safetensors' own limit
CONFIGS = ("config.json", "adapter_config.json")


def fingerprint(folder: Path) -> str:
    """'sha256:<hex>' of the folder's weights and configs (see the module)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.name in CONFIGS or p.suffix == ".safetensors"):
        size = path.stat().st_size
        digest.update(f"{path.name}\0{size}\0".encode())
        with path.open("rb") as file:
            if size <= WHOLE or path.suffix != ".safetensors":
                digest.update(file.read())
            else:
                _sample(file, size, digest)
    return "sha256:" + digest.hexdigest()


def _sample(file, size: int, digest) -> None:
    (header,) = struct.unpack("<Q", file.read(8))
    header = min(header, size - 8)  # a corrupt length reads no further than the file
    digest.update(file.read(min(header, MAX_HEADER)))
    start = 8 + header
    step = max((size - start - BLOCK) // (SAMPLES - 1), 1)
    for i in range(SAMPLES):
        file.seek(min(start + i * step, size - BLOCK))
        digest.update(file.read(BLOCK))
