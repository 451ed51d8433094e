"""What every task family's data shares: locating the data root, the data options'
checks, tokenized splits and their on-disk cache, dynamic-padding collation, and the
training order (a seeded, resumable, DDP-sharded sampler in a loader Lightning can
checkpoint mid-epoch). ``memtl.data.glue`` and ``memtl.data.qa`` keep only what is theirs:
task tables, readers, tokenization and their DataModules."""

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from memtl.errors import ConfigError

log = logging.getLogger(__name__)

# -----------------------------------------------------------------------------
# the data root


def default_data_root() -> Path | None:
    """$MEMTL_DATA_ROOT if set, else `../shared/data` beside the repo root, if it exists."""
    env = os.environ.get("MEMTL_DATA_ROOT")
    if env:
        path = Path(env).expanduser().resolve()
        if not path.is_dir():
            raise ConfigError(f"MEMTL_DATA_ROOT={env} is not a directory; unset it or point it at a "
                              "folder laid out like ../shared/data (with glue_data/ inside)")
        return path
    path = (Path(__file__).resolve().parents[3] / ".." / "shared" / "data").resolve()
    return path if path.is_dir() else None


def resolve_root(root) -> Path | None:
    """`root` checked and resolved; None -> default_data_root()."""
    if root is None:
        return default_data_root()
    path = Path(root).expanduser().resolve()
    if not path.is_dir():  # an explicit but wrong root must not silently go to the hub
        raise ConfigError(f"data.root={root} ({path}) is not a directory; set data.root to a folder "
                          "laid out like ../shared/data (with glue_data/ inside), or null for the default")
    return path


# -----------------------------------------------------------------------------
# options

# "lst" is GLUE's (memtl.data.glue); the check is shared so a typo fails the same way for every task
PROTOCOLS = ("dev", "lst")


def check_data_options(protocol: str = "dev", split_seed: int = 42, **sizes) -> None:
    """The data options a typo spoils, checked before anything is read (``train.py``'s
    preflight calls this too, so that bad values fail before a run folder exists)."""
    if protocol not in PROTOCOLS:
        raise ConfigError(f"data.protocol={protocol!r} is unknown; set data.protocol=dev (select and report "
                          "on the official dev set) or lst (Ladder Side-Tuning splits)")
    if not isinstance(split_seed, int) or isinstance(split_seed, bool):
        raise ConfigError(f"data.split_seed={split_seed!r} is invalid; set it to an integer (LST: 42)")
    low = {"num_workers": 0}
    for key, value in sizes.items():
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low.get(key, 1)):
            raise ConfigError(f"data.{key}={value!r} is invalid; set it to an integer >= {low.get(key, 1)}"
                              + (" or null" if key.startswith("max_") or key == "eval_batch_size" else ""))


# -----------------------------------------------------------------------------
# tokenized splits


class TokenizedSplit(Dataset):
    """Variable-length features stored flat (one int tensor per feature + row offsets):
    compact in memory, quick to torch.save/torch.load."""

    def __init__(self, features: dict[str, torch.Tensor], offsets: torch.Tensor, labels: torch.Tensor):
        self.features, self.offsets, self.labels = features, offsets, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        a, b = self.offsets[i].item(), self.offsets[i + 1].item()
        return {k: v[a:b].tolist() for k, v in self.features.items()} | {"labels": self.labels[i]}

    @property
    def lengths(self) -> list[int]:
        return self.offsets.diff().tolist()

    def state(self) -> dict:
        return {"features": self.features, "offsets": self.offsets, "labels": self.labels}

    def select(self, indices) -> "TokenizedSplit":
        """The rows at `indices`, in that order (a copy)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        starts, lengths = self.offsets[idx], self.offsets.diff()[idx]
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        # flat position of every kept token: its row's old start + its place in the row
        pos = torch.repeat_interleave(starts - offsets[:-1], lengths) + torch.arange(int(offsets[-1]))
        return TokenizedSplit({k: v[pos] for k, v in self.features.items()}, offsets, self.labels[idx])


class SiameseSplit(Dataset):
    """A sentence-pair split encoded apart (``pair_encoding="siamese"``): the first
    sentences and the second sentences as two ``TokenizedSplit``s of the same rows; an
    item holds the first one's features under their names and the second one's with the
    prefix ``b_``."""

    def __init__(self, a: TokenizedSplit, b: TokenizedSplit):
        self.a, self.b, self.labels = a, b, a.labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        b = self.b[i]
        del b["labels"]
        return self.a[i] | {f"b_{k}": v for k, v in b.items()}

    @property
    def lengths(self) -> list[int]:  # tokens encoded per row: what a batch costs
        return [x + y for x, y in zip(self.a.lengths, self.b.lengths)]

    def state(self) -> dict:
        return {"a": self.a.state(), "b": self.b.state()}

    def select(self, indices) -> "SiameseSplit":
        return SiameseSplit(self.a.select(indices), self.b.select(indices))


def split_from_state(state: dict):
    """The split ``state()`` stored (a cache file)."""
    if "a" in state:
        return SiameseSplit(TokenizedSplit(**state["a"]), TokenizedSplit(**state["b"]))
    return TokenizedSplit(**state)


# -----------------------------------------------------------------------------
# tokenization cache


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of everything that changes token ids: class, vocabulary/normalizer/templates
    (the fast tokenizer's full JSON, else the vocab), truncation side, model inputs."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None), spec.pop("padding", None)  # runtime state left by the last call
        body = json.dumps(spec, sort_keys=True)
    else:
        body = json.dumps(tokenizer.get_vocab(), sort_keys=True)
    extra = [type(tokenizer).__name__, tokenizer.truncation_side, list(tokenizer.model_input_names)]
    return hashlib.sha256((json.dumps(extra) + body).encode()).hexdigest()


def default_cache_dir() -> Path:
    return Path(os.environ.get("MEMTL_CACHE") or "~/.cache/memtl/tokenized").expanduser()


CACHE_VERSION = 1  # bump when the stored format or the tokenization call changes


class TokenCache:
    """Tokenized splits on disk, one ``.pt`` file per key; the key holds everything that
    changes the tokens (the caller's source fingerprint and settings, plus the tokenizer's
    fingerprint and the transformers version added here). Counts hits and misses."""

    def __init__(self, tokenizer, cache_dir=None):
        self.tokenizer = tokenizer
        self.dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.hits = self.misses = 0
        self._tok_fp = None

    def path(self, name: str, split: str, source_fingerprint: str, *settings) -> Path:
        """The file of one split: ``{name}-{split}-{hash of the key}.pt``."""
        if self._tok_fp is None:  # hashing the vocabulary is slow: once per cache
            self._tok_fp = tokenizer_fingerprint(self.tokenizer)
        import transformers

        # this key's layout is what existing cache files were named by: change it only with CACHE_VERSION
        key = json.dumps([CACHE_VERSION, source_fingerprint, self._tok_fp, transformers.__version__, *settings])
        return self.dir / f"{name}-{split}-{hashlib.sha256(key.encode()).hexdigest()[:24]}.pt"

    def load(self, path: Path):
        """The split stored at `path`, or None (absent, or unreadable: it will be overwritten)."""
        if path.is_file():
            try:
                ds = split_from_state(torch.load(path, weights_only=True))
                self.hits += 1
                return ds
            except Exception as e:  # a corrupt/old file: re-tokenize and overwrite it
                log.warning("ignoring unreadable tokenization cache %s (%s)", path, e)
        return None

    def store(self, path: Path, ds) -> None:
        """Write a freshly tokenized split (counted as a miss)."""
        self.misses += 1
        try:  # atomic: a concurrent reader sees the old file or the whole new one, never half
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            torch.save(ds.state(), tmp)
            os.replace(tmp, path)
        except OSError as e:  # caching is an optimisation: a read-only disk must not stop a run
            log.warning("could not write tokenization cache %s (%s)", path, e)


# -----------------------------------------------------------------------------
# collation, length-grouped sampling, resumable loading


class Collate:
    """Dynamic padding to the longest sequence in the batch (DataCollatorWithPadding);
    labels are stacked separately so their dtype stays long (float for regression)."""

    def __init__(self, tokenizer):
        from transformers import DataCollatorWithPadding

        self.pad = DataCollatorWithPadding(tokenizer, padding="longest", return_tensors="pt")

    def __call__(self, items):
        labels = torch.stack([it.pop("labels") for it in items])
        if "b_input_ids" not in items[0]:
            return dict(self.pad(items)) | {"labels": labels}
        # siamese pairs: each side padded to its own longest sequence
        a = [{k: v for k, v in it.items() if not k.startswith("b_")} for it in items]
        b = [{k[2:]: v for k, v in it.items() if k.startswith("b_")} for it in items]
        return dict(self.pad(a)) | {f"b_{k}": v for k, v in self.pad(b).items()} | {"labels": labels}


def length_grouped(lengths: torch.Tensor, batch_size: int, generator: torch.Generator, mega: int = 50) -> list[int]:
    """Like HF Trainer's group_by_length: shuffle, cut into mega-batches of 50 batches, sort
    each by length (so a batch pads little), then shuffle the batch order; the longest batch
    goes first so an out-of-memory shows up at step 1. Returns indices: a DataLoader with the
    same batch_size cuts them back into exactly these batches (a partial batch stays last)."""
    bs, g = batch_size, generator
    perm = torch.randperm(len(lengths), generator=g)
    # sort each mega-batch longest first, then cut it into batches
    mega_batches = [mb[torch.argsort(lengths[mb], descending=True, stable=True)] for mb in perm.split(mega * bs)]
    batches = list(torch.cat(mega_batches).split(bs))
    tail = [batches.pop()] if len(batches[-1]) < bs else []  # must stay last to keep batch boundaries
    batches = [batches[i] for i in torch.randperm(len(batches), generator=g)]
    if batches:
        longest = max(range(len(batches)), key=lambda i: lengths[batches[i]].max().item())
        batches.insert(0, batches.pop(longest))
    return torch.cat(batches + tail).tolist()


class TrainSampler(DistributedSampler):
    """The training order, a pure function of (seed, epoch): a seeded permutation (or the
    length-grouped order) per epoch, so a run resumed mid-epoch replays the same order and
    skips the batches it already trained on (``skip``, set by ``ResumableLoader``).

    Under DDP every rank draws the same order and takes every W-th index (padded to equal
    length like DistributedSampler); being a DistributedSampler, Lightning leaves it as is
    and calls ``set_epoch``. With group_by_length the groups are W*batch_size long, so each
    rank's batch comes from one group."""

    def __init__(self, dataset, batch_size: int, seed: int, lengths: list[int] | None = None, mega: int = 50,
                 num_replicas: int | None = None, rank: int | None = None):
        dist = torch.distributed
        if num_replicas is None:
            num_replicas = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if rank is None:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.batch_size, self.mega = batch_size, mega
        self.lengths = None if lengths is None else torch.as_tensor(lengths)
        self.skip: tuple[int, int] | None = None  # (epoch, batches already trained on in it)

    def order(self, epoch: int) -> list[int]:
        """All ranks' indices for one epoch, before sharding."""
        g = torch.Generator().manual_seed(self.seed + epoch)
        if self.lengths is not None:
            idx = length_grouped(self.lengths, self.batch_size * self.num_replicas, g, self.mega)
        else:
            idx = torch.randperm(len(self.dataset), generator=g).tolist()
        while len(idx) < self.total_size:  # equal length on every rank (DistributedSampler's padding)
            idx += idx[: self.total_size - len(idx)]
        return idx

    def __iter__(self):
        mine = self.order(self.epoch)[self.rank: self.total_size: self.num_replicas]
        skip, self.skip = self.skip, None
        if skip is not None and skip[0] == self.epoch:
            mine = mine[skip[1] * self.batch_size:]
        return iter(mine)


class ResumableLoader(DataLoader):
    """A DataLoader Lightning checkpoints mid-epoch (it calls ``state_dict`` when saving and
    ``load_state_dict`` on resume): the state is how many batches of which epoch were drawn,
    and the sampler then skips those batches' indices (no data is loaded for them)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._drawn = 0

    def __iter__(self):
        skip = self.sampler.skip
        self._drawn = skip[1] if skip is not None and skip[0] == self.sampler.epoch else 0
        for batch in super().__iter__():
            self._drawn += 1
            yield batch

    def state_dict(self) -> dict:
        return {"epoch": self.sampler.epoch, "batches": self._drawn}

    def load_state_dict(self, state: dict) -> None:
        # Lightning sets the sampler's epoch after this; the skip applies to that epoch only
        # (a checkpoint taken after an epoch's last batch resumes with the next epoch)
        if state["batches"] < len(self):
            self.sampler.skip = (state["epoch"], state["batches"])


def make_loader(ds, batch_size: int, collate, num_workers: int, seed: int, cls=DataLoader, **kw) -> DataLoader:
    # an own generator: creating a loader's iterator draws a seed from it, and must not
    # draw from the global RNG (dropout's), or evaluations would shift the dropout masks
    return cls(ds, batch_size=batch_size, collate_fn=collate, num_workers=num_workers,
               persistent_workers=num_workers > 0, generator=torch.Generator().manual_seed(seed), **kw)


def train_loader(ds, batch_size: int, collate, num_workers: int, seed: int, group_by_length: bool) -> ResumableLoader:
    """The training loader: ``TrainSampler``'s order (length-grouped if asked) in a ``ResumableLoader``."""
    lengths = ds.lengths if group_by_length else None
    sampler = TrainSampler(ds, batch_size, seed, lengths=lengths)
    return make_loader(ds, batch_size, collate, num_workers, seed, sampler=sampler, cls=ResumableLoader)
