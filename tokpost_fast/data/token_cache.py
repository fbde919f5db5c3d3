"""The post-training set on disk (METHOD.md B5): sharded token grids (or, for a continuous tokenizer, latents), their
index and the checks `post` runs.

    RUN/cache/plan.json                  what this cache is being built with (written first; resume checks it)
    RUN/cache/shard-00000.safetensors    rows [s * shard_size, (s + 1) * shard_size) of the set
    RUN/cache/index.json                 written last, once every shard exists: each shard's sha256 and rows,
                                         the tokenizer / generator checkpoint hashes, the sampling settings

A shard holds, per row (tensors of safetensors, paths in its string metadata):
    tokens       [n, h, w] uint16 (int32 when K > 65536)   the teacher-forced grid (METHOD.md A5.1)
    gt_tokens    [n, h, w] same dtype                        the real image's own codes (tokenizer.encode)
    keep_mask    [n, h, w] bool                              True where the ground-truth token was kept
    sample_index [n] int64, label [n] int64, sigma [n] float32, seed [n] int64 (the sampling call's seed)
    metadata "tokpost_cache": JSON {format, shard, relative_paths (the real image of each row, relative to
              data.root), settings (the same dict as the index's "settings")}
A latent shard (format tokpost-latent-cache/1: continuous tokenizer + DiT) holds instead of the grids:
    latents      [n, C, h, w] float16   the DiT's denoising of the real latent from level post_strength, divided
                                        back by scaling_factor: what tokenizer.decode takes
    gt_latents   [n, C, h, w] float16   the real image's own latent (tokenizer.encode_latent)
    strength [n] float32 and seed [n] int64 (the image's own noise seed) in place of sigma and the call's seed
and the index says "dtype": "float16" and "post_strength".
Shards are written to a dot-temp name, fsynced and renamed, so a present shard is a complete one.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from tokpost_fast.atomic import atomic_write_json, atomic_write_with, file_sha256

FORMAT = "tokpost-token-cache/1"
LATENT_FORMAT = "tokpost-latent-cache/1"
FORMATS = (FORMAT, LATENT_FORMAT)
INDEX = "index.json"
META_KEY = "tokpost_cache"
PLAN = "plan.json"


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}.safetensors"


def token_dtype(codebook_size: int) -> torch.dtype:
    """uint16 holds every code of K <= 65536 (ids 0 .. 65535); larger codebooks need int32."""
    return torch.uint16 if codebook_size <= 2**16 else torch.int32


def write_json_atomic(path: Path, payload: dict) -> None:
    atomic_write_json(path, payload, indent=1, sort_keys=True)


class CacheMismatch(ValueError):
    """A cache (or one of its shards) that does not belong to this run; the message names the file."""


def _concat_rows(cls, parts: Sequence):
    """Rows of several shards as one `cls` (CacheRows or LatentRows), in order: every tensor field concatenated."""
    tensors = {f.name: torch.cat([getattr(p, f.name) for p in parts])
               for f in dataclasses.fields(cls) if f.name != "relative_paths"}
    return cls(**tensors, relative_paths=[path for p in parts for path in p.relative_paths])


@dataclass
class CacheRows:
    """Rows of one shard, or of the whole cache (concatenated in row order)."""

    tokens: torch.Tensor          # [n, h, w] int64
    gt_tokens: torch.Tensor       # [n, h, w] int64
    keep_mask: torch.Tensor       # [n, h, w] bool
    sample_index: torch.Tensor    # [n] int64: the image's index in the ImageFolder (sorted class/file order)
    label: torch.Tensor           # [n] int64
    sigma: torch.Tensor           # [n] float32
    seed: torch.Tensor            # [n] int64
    relative_paths: list[str]

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def decoder_inputs(self) -> torch.Tensor:
        """What `post` decodes: the generated grids."""
        return self.tokens

    @staticmethod
    def concat(parts: Sequence["CacheRows"]) -> "CacheRows":
        return _concat_rows(CacheRows, parts)


@dataclass
class LatentRows:
    """Rows of a latent shard (continuous tokenizer + DiT), or of the whole latent cache."""

    latents: torch.Tensor         # [n, C, h, w] float16, unscaled (decode's input)
    gt_latents: torch.Tensor      # [n, C, h, w] float16
    sample_index: torch.Tensor    # [n] int64
    label: torch.Tensor           # [n] int64
    strength: torch.Tensor        # [n] float32: the noise level the DiT denoised from
    seed: torch.Tensor            # [n] int64: the seed of the image's own noise
    relative_paths: list[str]

    def __len__(self) -> int:
        return self.latents.shape[0]

    @property
    def decoder_inputs(self) -> torch.Tensor:
        """What `post` decodes: the generated latents (fp16; cast per batch, not here: a copy of the whole cache)."""
        return self.latents

    @staticmethod
    def concat(parts: Sequence["LatentRows"]) -> "LatentRows":
        return _concat_rows(LatentRows, parts)


def write_shard(path: Path, rows: CacheRows, shard: int, codebook_size: int, settings: dict) -> None:
    """Atomic: temp name in the same folder, fsync, rename. Same rows and settings -> the same bytes."""
    from safetensors.torch import save_file

    dtype = token_dtype(codebook_size)
    tensors = {
        # int64 -> int32 -> uint16: torch casts to uint16 only from a few dtypes; the ids fit either way
        "tokens": rows.tokens.to(torch.int32).to(dtype).contiguous(),
        "gt_tokens": rows.gt_tokens.to(torch.int32).to(dtype).contiguous(),
        "keep_mask": rows.keep_mask.to(torch.bool).contiguous(),
        "sample_index": rows.sample_index.to(torch.int64).contiguous(),
        "label": rows.label.to(torch.int64).contiguous(),
        "sigma": rows.sigma.to(torch.float32).contiguous(),
        "seed": rows.seed.to(torch.int64).contiguous(),
    }
    # One metadata key: safetensors keeps the metadata in a hash map, whose key order (and so the file's bytes)
    # would change from process to process with more than one.
    metadata = {META_KEY: json.dumps({"format": FORMAT, "shard": shard, "relative_paths": rows.relative_paths,
                                      "settings": settings}, sort_keys=True)}
    atomic_write_with(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def write_latent_shard(path: Path, rows: LatentRows, shard: int, settings: dict) -> None:
    """write_shard's twin for latent rows (same atomic write, same one-key metadata)."""
    from safetensors.torch import save_file

    tensors = {
        "latents": rows.latents.to(torch.float16).contiguous(),
        "gt_latents": rows.gt_latents.to(torch.float16).contiguous(),
        "sample_index": rows.sample_index.to(torch.int64).contiguous(),
        "label": rows.label.to(torch.int64).contiguous(),
        "strength": rows.strength.to(torch.float32).contiguous(),
        "seed": rows.seed.to(torch.int64).contiguous(),
    }
    metadata = {META_KEY: json.dumps({"format": LATENT_FORMAT, "shard": shard,
                                      "relative_paths": rows.relative_paths, "settings": settings}, sort_keys=True)}
    atomic_write_with(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_shard(path: Path) -> tuple[CacheRows | LatentRows, dict]:
    """(rows with int64 ids, or latent rows, the shard's metadata with settings decoded)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get(META_KEY, "{}"))
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    if meta.get("format") == LATENT_FORMAT:
        return LatentRows(**tensors, relative_paths=meta["relative_paths"]), meta
    if meta.get("format") != FORMAT:
        raise CacheMismatch(f"shard {path}: not a {FORMAT} or {LATENT_FORMAT} shard (format {meta.get('format')!r})")
    ids = lambda t: t.to(torch.int32).to(torch.int64)          # uint16 has few kernels: widen through int32
    rows = CacheRows(tokens=ids(tensors["tokens"]), gt_tokens=ids(tensors["gt_tokens"]),
                     keep_mask=tensors["keep_mask"], sample_index=tensors["sample_index"], label=tensors["label"],
                     sigma=tensors["sigma"], seed=tensors["seed"],
                     relative_paths=meta["relative_paths"])
    return rows, meta


# --- checks ------------------------------------------------------------------------------------------------------
def settings_diff(found: dict, expected: dict) -> list[str]:
    return [f"{k}: cache {found.get(k)!r} vs expected {expected.get(k)!r}"
            for k in sorted(set(found) | set(expected)) if found.get(k) != expected.get(k)]


def read_index(folder: Path) -> dict:
    path = Path(folder) / INDEX
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `train.py --stage cache` first (or let it finish: the "
                                "index is written once every shard exists)")
    with open(path) as f:
        index = json.load(f)
    if index.get("format") not in FORMATS:
        raise CacheMismatch(f"{path}: not a cache index of {FORMATS} (format {index.get('format')!r})")
    return index


def verify_cache(folder: Path, tokenizer_sha256: str, expected_settings: Optional[dict] = None,
                 checksums: bool = True) -> dict:
    """The index of a complete cache that matches this run, or CacheMismatch naming what does not:
    the tokenizer it was made with, the sampling settings, a missing shard, a shard whose sha256 differs from
    the index (tampered or half-copied), a shard whose own settings or row count disagree with the index."""
    folder = Path(folder)
    index = read_index(folder)
    made_with = index["tokenizer"]["sha256"]
    if made_with != tokenizer_sha256:
        raise CacheMismatch(f"{folder / INDEX}: made with tokenizer sha256 {made_with}, but this run's tokenizer "
                            f"is {tokenizer_sha256}; rebuild it with --stage cache")
    if expected_settings is not None:
        diff = settings_diff(index["settings"], expected_settings)
        if diff:
            raise CacheMismatch(f"{folder / INDEX}: built with other settings ({'; '.join(diff)}); rebuild it "
                                "with --stage cache or set the cache section to what it was built with")
    for entry in index["shards"]:
        path = folder / entry["file"]
        if not path.is_file():
            raise CacheMismatch(f"shard {path} is listed in {INDEX} but missing")
        if checksums:
            digest = file_sha256(path)
            if digest != entry["sha256"]:
                raise CacheMismatch(f"shard {path}: sha256 {digest} does not match {INDEX} ({entry['sha256']}); "
                                    "the file changed after the cache was built; delete it and re-run --stage cache")
    return index


def load_rows(folder: Path, index: dict) -> CacheRows | LatentRows:
    """Every shard of a verified index, in row order; a shard whose metadata disagrees with the index (settings,
    rows, position) is a CacheMismatch naming it."""
    parts = []
    for number, entry in enumerate(index["shards"]):
        path = Path(folder) / entry["file"]
        rows, meta = read_shard(path)
        diff = settings_diff(meta["settings"], index["settings"])
        if diff:
            raise CacheMismatch(f"shard {path}: its settings differ from {INDEX}: {'; '.join(diff)}")
        if meta.get("format") != index["format"]:
            raise CacheMismatch(f"shard {path}: format {meta.get('format')!r}, but {INDEX} is {index['format']!r}")
        if len(rows) != entry["rows"] or meta.get("shard") != number:
            raise CacheMismatch(f"shard {path}: holds shard {meta.get('shard')} with {len(rows)} rows; "
                                f"{INDEX} expects shard {number} with {entry['rows']} rows")
        parts.append(rows)
    return (LatentRows if index["format"] == LATENT_FORMAT else CacheRows).concat(parts)
