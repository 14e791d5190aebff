"""Datasets and partitions.

Datasets load once per process and are kept as normalised float tensors. The test split is used only
for evaluation (and by attacks that, like the authors' code, draw their malicious images from it and
then withhold them from benign evaluation); it is never given to clients.

Data directory resolution: an explicit ``data_dir`` (``--data-dir``) > ``$FEDBENCH_DATA_DIR`` > a
per-user cache directory (``$XDG_CACHE_HOME/fedbench`` or ``~/.cache/fedbench``).
"""

from __future__ import annotations

import functools
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from fedbench.components import POSITIVE, AT_LEAST_ONE, Dataset, DatasetTensors, Partition, param
from fedbench.errors import DataError


def resolve_data_dir(explicit: str | os.PathLike | None = None) -> Path:
    if explicit:
        return Path(explicit).expanduser()
    env = os.environ.get("FEDBENCH_DATA_DIR")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "fedbench"


@functools.lru_cache(maxsize=4)
def load_dataset(dataset: Any, data_dir: str | None = None) -> DatasetTensors:
    """Load (once per process) the dataset described by a ``ComponentSpec``."""
    return dataset.build().load(data_dir)


def _normalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    mean = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return ((x - mean) / std).contiguous()


# --------------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class Digits(Dataset):
    """scikit-learn's embedded 8x8 handwritten digits (1,797 images; offline, no data directory)."""

    name: ClassVar[str] = "digits"
    default_model: ClassVar[str] = "mlp"
    #: 1,497 training images cannot feed the paper's 100 clients; 20 clients keep about 75 each.
    scenario_defaults: ClassVar[dict] = {"num_clients": 20, "lr": 0.05}
    test_size: int = param(300, "images held out as the test split (fixed, seed-independent)", check=AT_LEAST_ONE)

    def load(self, data_dir):
        from sklearn.datasets import load_digits

        bunch = load_digits()
        x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.tensor(bunch.target, dtype=torch.int64)
        if self.test_size >= len(y):
            raise DataError(f"digits: test_size={self.test_size} leaves no training images (there are {len(y)})")
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
        test, train = order[: self.test_size], order[self.test_size :]
        mean, std = x[train].mean().item(), x[train].std().item()
        x = _normalise(x, [mean], [std])
        return DatasetTensors(x[train], y[train], x[test], y[test], num_classes=10)


def data_dir_source(explicit: str | os.PathLike | None = None) -> str:
    """Where :func:`resolve_data_dir` took the data directory from, in the words of an error message."""
    if explicit:
        return "--data-dir"
    if os.environ.get("FEDBENCH_DATA_DIR"):
        return "$FEDBENCH_DATA_DIR"
    return "the default data folder"


def _torchvision_splits(dataset_cls, name: str, root: Path, source: str, layout: str):
    """Train and test splits of a torchvision dataset: the files already under ``root``, else a
    download; when both fail (no network), a one-line :class:`DataError` that says where fedbench
    looked and how to fix it.

    The download goes to a temporary folder first and is copied under ``root`` only once it is
    complete, so a mistyped ``--data-dir`` is never created and a failed download leaves nothing
    behind (torchvision itself creates ``<root>/FashionMNIST/raw`` before its first request).
    torchvision's own messages (URLs, progress) go to stderr: stdout may be a ``--json`` document."""
    import contextlib
    import shutil
    import sys
    import tempfile

    try:
        return dataset_cls(str(root), train=True, download=False), dataset_cls(str(root), train=False, download=False)
    except RuntimeError:
        pass
    staging = Path(tempfile.mkdtemp(prefix=f"fedbench-{name}-"))
    try:
        try:
            with contextlib.redirect_stdout(sys.stderr):
                dataset_cls(str(staging), train=True, download=True)
                dataset_cls(str(staging), train=False, download=True)
        except Exception as error:  # noqa: BLE001 - any download failure becomes advice; the cause stays chained
            where = f"{root} (from {source}{'' if root.is_dir() else '; it does not exist'})"
            raise DataError(
                f"{name}: no {layout} under {where}, and downloading it failed; set --data-dir or "
                f"FEDBENCH_DATA_DIR to the folder that holds {layout}, or connect to the network"
            ) from error
        try:
            shutil.copytree(staging, root, dirs_exist_ok=True)
        except OSError as error:
            raise DataError(f"{name}: downloaded, but cannot write it under {root} ({error.strerror or error})") from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    try:
        return dataset_cls(str(root), train=True, download=False), dataset_cls(str(root), train=False, download=False)
    except RuntimeError as error:
        raise DataError(f"{name}: downloaded into {root}, but the files cannot be read ({error})") from error


@dataclass(kw_only=True)
class FashionMNIST(Dataset):
    """Fashion-MNIST via torchvision (60,000 train / 10,000 test 28x28 images), the paper's first dataset."""

    name: ClassVar[str] = "fmnist"
    default_model: ClassVar[str] = "fmnist-cnn"

    def load(self, data_dir):
        from torchvision import datasets

        root = resolve_data_dir(data_dir)
        train, test = _torchvision_splits(datasets.FashionMNIST, self.name, root, data_dir_source(data_dir),
                                          "FashionMNIST/raw/")

        def tensors(split):
            return split.data.unsqueeze(1).float() / 255.0, split.targets.long()

        (trx, tr_y), (tex, te_y) = tensors(train), tensors(test)
        # The authors' code normalises Fashion-MNIST with MNIST's statistics (reference section 1).
        return DatasetTensors(
            _normalise(trx, [0.1307], [0.3081]), tr_y, _normalise(tex, [0.1307], [0.3081]), te_y, 10
        )


@dataclass(kw_only=True)
class Cifar10(Dataset):
    """CIFAR-10 (50,000 / 10,000 32x32 colour images) via torchvision, or the offline JPEG copy if present."""

    name: ClassVar[str] = "cifar10"
    default_model: ClassVar[str] = "cifar-cnn"

    def load(self, data_dir):
        root = resolve_data_dir(data_dir)
        jpeg = root / "cifar10-jpeg" / "cifar10_jpeg_bytes.npz"
        if (root / "cifar-10-batches-py").is_dir() or not jpeg.is_file():
            trx, tr_y, tex, te_y = self._torchvision(root, data_dir_source(data_dir))
        else:
            trx, tr_y, tex, te_y = self._jpeg(jpeg)
        # The authors' code normalises CIFAR-10 with mean = std = 0.5 per channel.
        half = [0.5, 0.5, 0.5]
        return DatasetTensors(_normalise(trx, half, half), tr_y, _normalise(tex, half, half), te_y, 10)

    def _torchvision(self, root: Path, source: str):
        from torchvision import datasets

        train, test = _torchvision_splits(
            datasets.CIFAR10, self.name, root, source, "cifar-10-batches-py/ or cifar10-jpeg/cifar10_jpeg_bytes.npz"
        )

        def tensors(split):
            x = torch.from_numpy(split.data).permute(0, 3, 1, 2).float() / 255.0
            return x, torch.tensor(split.targets, dtype=torch.int64)

        return (*tensors(train), *tensors(test))

    @staticmethod
    def _jpeg(path: Path):
        """The JPEG-recompressed copy (not bit-exact CIFAR-10; mean abs. pixel error ~5.9/255)."""
        from PIL import Image

        z = np.load(path)

        def decode(split):
            buf, off = z[f"{split}_jpeg"], z[f"{split}_offsets"]
            imgs = np.stack(
                [np.asarray(Image.open(io.BytesIO(buf[off[i] : off[i + 1]].tobytes())).convert("RGB")) for i in range(len(off) - 1)]
            )
            x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255.0
            return x, torch.from_numpy(z[f"{split}_labels"].astype(np.int64))

        return (*decode("train"), *decode("test"))


# --------------------------------------------------------------------------------------------------
# Partitions
# --------------------------------------------------------------------------------------------------
def _check_nonempty(name: str, parts: list[torch.Tensor]) -> list[torch.Tensor]:
    empty = [i for i, p in enumerate(parts) if len(p) == 0]
    if empty:
        raise DataError(
            f"partition '{name}' left {len(empty)} client(s) without data (first: client {empty[0]}); "
            "use fewer clients or a less skewed partition"
        )
    return parts


@dataclass(kw_only=True)
class IID(Partition):
    """Uniform random split into near-equal client shares."""

    name: ClassVar[str] = "iid"

    def split(self, labels, n_clients, generator):
        order = torch.randperm(len(labels), generator=generator)
        return _check_nonempty(self.name, list(torch.tensor_split(order, n_clients)))


@dataclass(kw_only=True)
class Shards(Partition):
    """The paper's non-IID split: sort by label, cut into per_client*N shards, per_client random shards per client."""

    name: ClassVar[str] = "shards"
    per_client: int = param(2, "shards per client (2 in the paper: mostly two labels per client)", check=AT_LEAST_ONE)

    def split(self, labels, n_clients, generator):
        by_label = torch.argsort(labels, stable=True)
        shards = torch.tensor_split(by_label, n_clients * self.per_client)
        owner = torch.randperm(len(shards), generator=generator).view(n_clients, self.per_client)
        parts = [torch.cat([shards[int(s)] for s in row]) for row in owner]
        return _check_nonempty(self.name, parts)


@dataclass(kw_only=True)
class DirichletPartition(Partition):
    """Per-class client shares drawn from Dirichlet(alpha): small alpha means strong label skew."""

    name: ClassVar[str] = "dirichlet"
    alpha: float = param(0.5, "Dirichlet concentration (smaller = more skewed)", check=POSITIVE)

    def split(self, labels, n_clients, generator):
        rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator)))
        parts: list[list[torch.Tensor]] = [[] for _ in range(n_clients)]
        for cls in torch.unique(labels).tolist():
            idx = torch.nonzero(labels == cls).flatten()
            idx = idx[torch.from_numpy(rng.permutation(len(idx)))]
            shares = rng.dirichlet([self.alpha] * n_clients)
            cuts = np.floor(np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for client, chunk in enumerate(np.split(idx.numpy(), cuts)):
                parts[client].append(torch.from_numpy(chunk))
        return _check_nonempty(self.name, [torch.cat(p) for p in parts])


def take_fraction(parts: list[torch.Tensor], frac: float) -> list[torch.Tensor]:
    """Keep the first ``ceil(frac * n)`` indices of each client (the authors' code trains on 80%)."""
    if frac >= 1.0:
        return parts
    return [p[: max(1, math.ceil(round(frac * len(p), 9)))] for p in parts]
