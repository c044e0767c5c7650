"""Batches on the device: the fast device-resident path and the standard DataLoader path.

``DeviceLoader`` (``data.pipeline=resident``) keeps the whole uint8 data set on the training device
(on a CPU run: in RAM), shuffles with ``randperm`` there and does pad-crop / flip / normalise as
a few tensor ops per batch: no workers, no per-sample Python. ``TorchLoader``
(``data.pipeline=loader``) is a torch DataLoader with workers and torchvision transforms, used
for image folders and as the reference pipeline in the benchmark.

Both are seeded per epoch (``set_epoch``), so a run resumed at epoch k sees the same batches as
an uninterrupted one, and both shard by rank for data-parallel training. In ``TorchLoader`` each
image's random transform is drawn from a seed of its own (of the epoch and the image), which
the sampler hands to the worker with its index: the augmented batches do not depend on
``data.num_workers``, nor on which worker reads an image, nor on where a resumed run restarted
its workers.
"""

from __future__ import annotations

from typing import Dict, Iterator, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ortho_run.datasets.base import DataSet, Split
from ortho_run.errors import ConfigError, DataError, described
from ortho_run.parallel import gather_split


def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919 + 17) % (2**63 - 1)


def _num_batches(n: int, batch_size: int, drop_last: bool) -> int:
    return n // batch_size if drop_last else -(-n // batch_size)


def shard_size(n: int, train: bool, rank: int, world_size: int) -> int:
    """How many of ``n`` images one rank reads: training, equal shards (the tail that does not
    divide is left out, reshuffled each epoch); evaluation, every image once over the ranks
    (rank r reads r, r + world, ...)."""
    if world_size <= 1:
        return n
    return n // world_size if train else len(range(rank, n, world_size))


def _drop_last(train: bool, shard: int, batch_size: int, drop_last: Optional[bool]) -> bool:
    """Training drops its last partial batch, unless the shard holds less than one batch
    (a tiny data set still gets one batch per epoch)."""
    return (train if drop_last is None else drop_last) and shard >= batch_size


def smallest_train_batch(n: int, batch_size: int, rank: int = 0, world_size: int = 1) -> int:
    """The fewest images a training batch of one rank holds, over ``n`` training images."""
    shard = shard_size(n, True, rank, world_size)
    if _drop_last(True, shard, batch_size, None):
        return batch_size
    return shard % batch_size or batch_size


def _unshard(rows: Tensor, train: bool, n: int, world_size: int) -> Tensor:
    """What an evaluation loader computed from its rank's shard of the split (one row an
    image, in the order it read them), as every rank's rows of the whole split in its order:
    what one process computes. A training loader's rows, and one process's, as they are."""
    if train or world_size <= 1:
        return rows
    return gather_split(rows, n)


class _EvalShard(torch.utils.data.Sampler):
    """Rank r of ``world`` reads images r, r + world, ...: each image once over the ranks
    (torch's DistributedSampler pads the last round with repeated images instead)."""

    def __init__(self, n: int, rank: int, world_size: int):
        self.idx = range(rank, n, world_size)

    def __iter__(self):
        return iter(self.idx)

    def __len__(self) -> int:
        return len(self.idx)


class DeviceLoader:
    def __init__(self, split: Split, batch_size: int, device: torch.device, mean: Sequence[float],
                 std: Sequence[float], train: bool, augment: str = "none", padding: int = 4,
                 seed: int = 0, drop_last: Optional[bool] = None, channels_last: bool = False,
                 rank: int = 0, world_size: int = 1, limit_batches: Optional[int] = None,
                 color_jitter: float = 0.0, pad_mode: str = "zeros", flip_mode: str = "random"):
        if split.x is None:
            raise ConfigError("data.pipeline=resident needs an array data set (digits, synthetic, "
                              "cifar*); image folders use data.pipeline=loader")
        self.device = torch.device(device)
        self.train, self.augment, self.pad = train, str(augment), padding if train else 0
        self.jitter = color_jitter if train else 0.0
        if self.augment != "crop_flip":
            self.pad = 0
        x = split.x
        if self.pad and str(pad_mode) == "reflect":  # uint8 has no reflect pad: in chunks
            x = torch.cat([torch.nn.functional.pad(c.float(), (self.pad,) * 4, mode="reflect")
                           .to(torch.uint8) for c in x.split(4096)])
        elif self.pad:
            x = torch.nn.functional.pad(x, (self.pad,) * 4)  # zero padding, as RandomCrop(pad)
        self.x = x.to(self.device)
        self.y = split.y.to(self.device)
        self.h, self.w = split.x.shape[-2:]
        self.n = len(split)
        self.batch_size = batch_size
        self.rank, self.world = rank, world_size
        self.shard = shard_size(self.n, train, rank, world_size)
        self.drop_last = _drop_last(train, self.shard, batch_size, drop_last)
        self.seed, self.epoch = seed, 0
        self.channels_last = channels_last
        self.limit = limit_batches
        c = split.x.shape[1]
        self.mean = torch.tensor(mean, device=self.device).view(1, c, 1, 1) * 255
        self.inv_std = 1.0 / (torch.tensor(std, device=self.device).view(1, c, 1, 1) * 255)
        self._ar_h = torch.arange(self.h, device=self.device)
        self._ar_w = torch.arange(self.w, device=self.device)
        #: alternating flips: the images mirrored in even epochs, drawn once (seeded)
        self.flip_bits = None
        if str(flip_mode) == "alternating":
            gen = torch.Generator(device=self.device).manual_seed(epoch_seed(seed, -1))
            self.flip_bits = torch.rand(self.n, device=self.device, generator=gen) < 0.5

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self, gen) -> Tensor:
        if not self.train:
            idx = torch.arange(self.n, device=self.device)
        else:
            idx = torch.randperm(self.n, device=self.device, generator=gen)
        if self.world > 1:  # shard_size's shards
            per = self.shard
            idx = idx[self.rank * per:(self.rank + 1) * per] if self.train else idx[self.rank::self.world]
        return idx

    def __len__(self) -> int:
        b = _num_batches(self.shard, self.batch_size, self.drop_last)
        return min(b, self.limit) if self.limit else b

    def unshard(self, rows: Tensor) -> Tensor:
        return _unshard(rows, self.train, self.n, self.world)

    def _augment(self, idx: Tensor, gen) -> Tensor:
        b = len(idx)
        if self.pad:
            oy = torch.randint(0, 2 * self.pad + 1, (b,), device=self.device, generator=gen)
            ox = torch.randint(0, 2 * self.pad + 1, (b,), device=self.device, generator=gen)
            rows = (oy[:, None] + self._ar_h)[:, :, None]  # B×H×1
            cols = (ox[:, None] + self._ar_w)[:, None, :]  # B×1×W
            # advanced indexing puts the broadcast B×H×W dims first: B×H×W×C (an NHWC tensor)
            xb = self.x[idx[:, None, None], :, rows, cols].permute(0, 3, 1, 2)
        else:
            xb = self.x[idx]
        if self.augment in ("flip", "crop_flip"):
            if self.flip_bits is not None:
                flip = self.flip_bits[idx] ^ (self.epoch % 2 == 1)
            else:
                flip = torch.rand(b, device=self.device, generator=gen) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(3), xb)
        return xb

    def __iter__(self) -> Iterator[Tuple[Tensor, Tensor]]:
        gen = torch.Generator(device=self.device)
        gen.manual_seed(epoch_seed(self.seed, self.epoch))
        idx = self._indices(gen)
        for i in range(len(self)):
            bi = idx[i * self.batch_size:(i + 1) * self.batch_size]
            xb = self._augment(bi, gen) if self.train else self.x[bi]
            memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
            xb = xb.float()
            if self.jitter:
                xb = color_jitter(xb, jitter_factors(len(xb), self.jitter, gen, self.device))
            xb = ((xb - self.mean) * self.inv_std).contiguous(memory_format=memory_format)
            yield xb, self.y[bi]


LUMA = (0.2989, 0.587, 0.114)  # ITU-R 601-2, as torchvision's rgb_to_grayscale


def jitter_factors(n: int, strength: float, gen, device) -> Tensor:
    """Per image: brightness, contrast and saturation factors, uniform in [1 − s, 1 + s]."""
    lo, hi = max(0.0, 1.0 - strength), 1.0 + strength
    return torch.rand(n, 3, device=device, generator=gen) * (hi - lo) + lo


def color_jitter(x: Tensor, factors: Tensor) -> Tensor:
    """Brightness, contrast and saturation jitter of float images in [0, 255] (B×C×H×W), as
    torchvision's ``adjust_brightness``/``adjust_contrast``/``adjust_saturation`` with the given
    per-image factors, in that order (torchvision's ColorJitter draws the order per image; a
    fixed order keeps this a few batched ops). Grey images get brightness and contrast only."""
    def blend(img, other, f):
        return (f[:, None, None, None] * img + (1 - f[:, None, None, None]) * other).clamp(0, 255)

    def gray(img):
        if img.shape[1] == 1:
            return img
        w = torch.tensor(LUMA, device=img.device, dtype=img.dtype).view(1, 3, 1, 1)
        return (img * w).sum(1, keepdim=True)

    x = blend(x, torch.zeros_like(x[:, :1]), factors[:, 0])
    x = blend(x, gray(x).mean(dim=(1, 2, 3), keepdim=True), factors[:, 1])
    if x.shape[1] == 3:
        x = blend(x, gray(x), factors[:, 2])
    return x


def sample_seed(epoch_base: int, index: int) -> int:
    """The seed of image ``index``'s random transform in the epoch whose ``epoch_seed`` is
    ``epoch_base``."""
    return (epoch_base * 6_364_136_223_846_793_005 + index * 1_442_695_040_888_963_407
            + 1) % (2**63 - 1)


class _Seeded(torch.utils.data.Sampler):
    """The indices of ``inner``, each with its image's transform seed in the current epoch of
    ``loader`` (read when an epoch's iteration starts, in the main process)."""

    def __init__(self, inner, loader: "TorchLoader"):
        self.inner, self.loader = inner, loader

    def __iter__(self):
        base = epoch_seed(self.loader.seed, self.loader.epoch)
        return ((int(i), sample_seed(base, int(i))) for i in self.inner)

    def __len__(self) -> int:
        return len(self.inner)


class _Images(torch.utils.data.Dataset):
    """A split's images for torchvision transforms, read by (index, transform seed): the
    transform draws from the global torch generator, seeded with the image's seed for it alone
    (the worker's own random state is put back after)."""

    def __init__(self, y: Tensor, transform):
        self.y, self.transform = y.numpy(), transform

    def __len__(self):
        return len(self.y)

    def image(self, i: int):  # pragma: no cover - each kind reads its own
        raise NotImplementedError

    def __getitem__(self, key):
        i, seed = key
        img = self.image(i)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(img), int(self.y[i])


class _ArrayImages(_Images):
    """uint8 arrays → PIL → torchvision transforms (the standard per-sample pipeline)."""

    def __init__(self, x: Tensor, y: Tensor, transform):
        super().__init__(y, transform)
        self.x = x.permute(0, 2, 3, 1).numpy()  # HWC for PIL

    def image(self, i):
        from PIL import Image

        a = self.x[i]
        return Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a)


class _RecordImages(_Images):
    """Images read lazily from an indexable (a Hugging Face or torchvision data set)."""

    def __init__(self, records, y: Tensor, transform, mode: str = "RGB"):
        super().__init__(y, transform)
        self.records, self.mode = records, mode

    def image(self, i):
        from ortho_run.datasets.records import to_pil

        return to_pil(self.records[i]).convert(self.mode)


class _FileImages(_Images):
    def __init__(self, files, y: Tensor, transform):
        super().__init__(y, transform)
        self.files = files

    def image(self, i):
        from PIL import Image

        try:
            with open(self.files[i], "rb") as f:
                img = Image.open(f).convert("RGB")
        except Exception as exc:  # runs in a worker: the loader re-raises it by name
            raise DataError(f"cannot decode the image {self.files[i]} ("
                            f"{described(exc)}): remove or replace "
                            f"it, or set data.verify_images=true to leave out every such "
                            f"file") from None
        return img


def standard_transform(train: bool, augment: str, padding: int, image_size: int, mean, std,
                       files: bool, color_jitter: float = 0.0, pad_mode: str = "zeros"):
    from torchvision import transforms as T

    ops = []
    if files:
        ops += ([T.RandomResizedCrop(image_size)] if train and augment != "none"
                else [T.Resize(int(image_size * 1.14)), T.CenterCrop(image_size)])
    elif train and augment == "crop_flip":
        ops.append(T.RandomCrop(image_size, padding=padding,
                                padding_mode="reflect" if pad_mode == "reflect" else "constant"))
    if train and augment in ("flip", "crop_flip"):
        ops.append(T.RandomHorizontalFlip())
    if train and color_jitter:
        ops.append(T.ColorJitter(color_jitter, color_jitter, color_jitter))
    ops += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(ops)


class TorchLoader:
    def __init__(self, split: Split, batch_size: int, device: torch.device, mean, std,
                 train: bool, augment: str = "none", padding: int = 4, image_size: int = 32,
                 seed: int = 0, num_workers: int = 4, channels_last: bool = False,
                 rank: int = 0, world_size: int = 1, limit_batches: Optional[int] = None,
                 drop_last: Optional[bool] = None, color_jitter: float = 0.0,
                 image_mode: str = "RGB", pad_mode: str = "zeros"):
        files = split.x is None
        tf = standard_transform(train, str(augment), padding, image_size, mean, std, files,
                                color_jitter, pad_mode)
        if split.records is not None:
            ds = _RecordImages(split.records, split.y, tf, image_mode)
        else:
            ds = _FileImages(split.files, split.y, tf) if files else _ArrayImages(split.x, split.y, tf)
        self.device = torch.device(device)
        self.seed, self.epoch, self.limit = seed, 0, limit_batches
        self.channels_last = channels_last
        self.gen = torch.Generator()  # the epoch's shuffle, seeded per epoch
        if world_size > 1:
            sampler = (torch.utils.data.DistributedSampler(ds, world_size, rank, shuffle=True,
                                                           seed=seed, drop_last=True)
                       if train else _EvalShard(len(ds), rank, world_size))
        else:
            sampler = (torch.utils.data.RandomSampler(ds, generator=self.gen) if train
                       else torch.utils.data.SequentialSampler(ds))
        self.sampler = sampler
        self.train, self.n, self.world = train, len(ds), world_size
        drop = _drop_last(train, shard_size(len(ds), train, rank, world_size), batch_size,
                          drop_last)
        self.dl = torch.utils.data.DataLoader(
            ds, batch_size=batch_size, sampler=_Seeded(sampler, self),
            num_workers=num_workers, pin_memory=self.device.type == "cuda", drop_last=drop,
            persistent_workers=num_workers > 0,
            # the workers' base seeds: a generator of their own, so that neither the shuffle
            # nor the global random stream depends on how often the loader draws one (each
            # epoch without workers, once with persistent ones)
            generator=torch.Generator().manual_seed(epoch_seed(seed, -2)),
            prefetch_factor=4 if num_workers > 0 else None)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.gen.manual_seed(epoch_seed(self.seed, epoch))
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __len__(self):
        return min(len(self.dl), self.limit) if self.limit else len(self.dl)

    def unshard(self, rows: Tensor) -> Tensor:
        return _unshard(rows, self.train, self.n, self.world)

    def __iter__(self):
        self.gen.manual_seed(epoch_seed(self.seed, self.epoch))
        mf = torch.channels_last if self.channels_last else torch.contiguous_format
        it = iter(self.dl)
        for i in range(len(self)):
            try:
                x, y = next(it)
            except StopIteration:
                return
            except DataError as exc:  # from a worker: keep the message, drop the traceback
                self.close()
                text = str(exc)
                lines = [ln for ln in text.splitlines() if "cannot decode the image" in ln]
                raise DataError(lines[-1].split("DataError: ")[-1] if lines else text) from None
            yield (x.to(self.device, non_blocking=True).contiguous(memory_format=mf),
                   y.to(self.device, non_blocking=True))

    def close(self) -> None:
        """Stop the worker processes now (they persist across epochs): a run that ends, or
        fails, leaves none behind in the process, e.g. for the next job of a sweep."""
        it = getattr(self.dl, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self.dl._iterator = None


def choose_pipeline(requested: str, ds: DataSet, device: torch.device) -> str:
    if requested == "auto":
        if not ds.is_array:
            return "loader"
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            need = sum(s.x.numel() for s in (ds.train, ds.val, ds.test) if s is not None) * 1.3
            return "resident" if need < 0.5 * free else "loader"
        return "resident"
    if requested == "resident" and not ds.is_array:
        raise ConfigError("data.pipeline=resident needs an array data set; image folders are read by "
                          "data.pipeline=loader (or auto)")
    return requested


def build_loader(ds: DataSet, split: Split, cfg, device, train: bool, seed: int,
                 pipeline: str, channels_last: bool = False, rank: int = 0, world_size: int = 1,
                 limit_batches: Optional[int] = None):
    """One loader for ``split`` following ``cfg`` (a DataConfig)."""
    bs = cfg.batch_size if train else cfg.eval_batch_size
    common = dict(batch_size=bs, device=device, mean=ds.mean, std=ds.std, train=train,
                  augment=str(cfg.augment), padding=cfg.crop_padding, seed=seed,
                  channels_last=channels_last, rank=rank, world_size=world_size,
                  limit_batches=limit_batches if train else None,
                  color_jitter=cfg.color_jitter if train else 0.0)
    if pipeline == "resident":
        return DeviceLoader(split, pad_mode=str(cfg.crop_padding_mode),
                            flip_mode=str(cfg.flip_mode), **common)
    if train and str(cfg.flip_mode) == "alternating" and str(cfg.augment) != "none":
        raise ConfigError("data.flip_mode=alternating needs data.pipeline=resident (the "
                          "loader's workers cannot follow the epoch's flips): set "
                          "data.pipeline=resident or data.flip_mode=random")
    return TorchLoader(split, image_size=ds.image_size, num_workers=cfg.num_workers,
                       image_mode="L" if ds.channels == 1 else "RGB",
                       pad_mode=str(cfg.crop_padding_mode), **common)


def build_loaders(ds: DataSet, cfg, device, seed: int, pipeline: str, channels_last: bool = False,
                  rank: int = 0, world_size: int = 1, limit_train_batches: Optional[int] = None
                  ) -> Tuple[object, Dict[str, object]]:
    """A run's loaders: the training loader and the evaluation loaders by split name (``test``,
    and ``val`` when the data set holds one)."""
    kw = dict(pipeline=pipeline, channels_last=channels_last, rank=rank, world_size=world_size)
    train = build_loader(ds, ds.train, cfg, device, True, seed, limit_batches=limit_train_batches,
                         **kw)
    evals = {"test": build_loader(ds, ds.test, cfg, device, False, seed, **kw)}
    if ds.val is not None:
        evals["val"] = build_loader(ds, ds.val, cfg, device, False, seed, **kw)
    return train, evals


def init_images(ds: DataSet, n: int, seed: int, device, wanted_by: str) -> Optional[Tensor]:
    """``n`` training images, drawn with ``seed`` (``data.split_seed``) and normalised as the
    loaders normalise them, for a backbone that initialises itself from data (``wanted_by``
    names it); None when ``n`` is 0."""
    if not n:
        return None
    if ds.train.x is None:
        raise ConfigError(f"{wanted_by} initialises itself from {n} training images held in "
                          f"memory: use an array data set (cifar10, cifar100, digits, "
                          f"synthetic), not data={ds.name} read from files")
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(ds.train), generator=gen)[:n]
    x = ds.train.x[idx].to(device).float().div_(255)
    c = x.shape[1]
    mean = torch.tensor(ds.mean, device=device).view(1, c, 1, 1)
    std = torch.tensor(ds.std, device=device).view(1, c, 1, 1)
    return (x - mean) / std
