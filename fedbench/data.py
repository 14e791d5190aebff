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

from fedbench.components import POSITIVE, AT_LEAST_ONE, Dataset, DatasetTensors, NON_NEGATIVE, Partition, param
from fedbench.errors import DataError, SpecError


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
    except (RuntimeError, ValueError, OSError) as error:
        folder = root / layout.split(" ")[0]  # the torchvision layout (the first one named)
        if "not found" not in str(error).lower():  # the files are there but cannot be read: never re-download
            raise DataError(
                f"{name}: the files under {folder} are damaged ({_damage(folder)}); delete them to "
                "download them again, or copy intact ones there"
            ) from error
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
            _move_in(staging, root)
        except OSError as error:
            raise DataError(f"{name}: downloaded, but cannot write it under {root} ({error.strerror or error})") from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    try:
        return dataset_cls(str(root), train=True, download=False), dataset_cls(str(root), train=False, download=False)
    except RuntimeError as error:
        raise DataError(f"{name}: downloaded into {root}, but the files cannot be read ({error})") from error


def _move_in(staging: Path, root: Path) -> None:
    """Copy a finished download under ``root`` file by file, each to a temporary name beside its
    destination and then renamed (atomic on one file system), so a kill or a concurrent reader never
    sees a half-copied file."""
    import shutil

    for src in sorted(p for p in staging.rglob("*") if p.is_file()):
        dest = root / src.relative_to(staging)
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = dest.with_name(f".{dest.name}.partial-{os.getpid()}")
        shutil.copyfile(src, partial)
        os.replace(partial, dest)


def _damage(folder: Path) -> str:
    """What is wrong with a dataset folder's files, for the error: IDX files (the MNIST family) whose
    size disagrees with their own header, else every file with its size."""
    import struct

    bad, files = [], sorted(f for f in folder.glob("*") if f.is_file()) if folder.is_dir() else []
    for f in files:
        if "idx" not in f.name or f.suffix == ".gz":
            continue
        size = f.stat().st_size
        with open(f, "rb") as fh:
            head = fh.read(4)
            ndim = head[3] if len(head) == 4 else 0
            dims = fh.read(4 * ndim)
        if len(head) < 4 or len(dims) < 4 * ndim:
            bad.append(f"{f.name}: {size} bytes, too short for its header")
            continue
        expected = 4 + 4 * ndim + math.prod(struct.unpack(f">{ndim}I", dims))
        if size != expected:
            bad.append(f"{f.name}: {size} bytes, its header says {expected}")
    if bad:
        return "; ".join(bad)
    return ", ".join(f"{f.name} {f.stat().st_size} bytes" for f in files) or "no files"


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
# Bring your own data
# --------------------------------------------------------------------------------------------------
def _standardise(train_x: torch.Tensor, test_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalise both splits per channel with the TRAIN split's mean and std (a constant channel,
    std 0, is only centred)."""
    mean = train_x.mean(dim=(0, 2, 3))
    std = train_x.std(dim=(0, 2, 3))
    std = torch.where(std > 0, std, torch.ones_like(std))
    return _normalise(train_x, mean, std), _normalise(test_x, mean, std)


def _require_path(component: Dataset, param_name: str) -> None:
    """Refuse a user-data dataset spec without its path, when the spec is parsed (not at load time).

    The path is a spec parameter, so it is part of the cell's spec and hash exactly as typed. It is not
    resolved to an absolute path: that would make a spec depend on the directory it was parsed in,
    and a relative spec could no longer be shared between machines. ``~`` is expanded and a relative
    path is read from the current directory when the data loads."""
    if not getattr(component, param_name).strip():
        raise SpecError(f"{component.name}: parameter '{param_name}' is required: {component.name}:{param_name}=PATH")


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
#: PIL modes read as one grayscale channel (alpha dropped); every other 8-bit mode (RGB, RGBA, P, CMYK, ...) is RGB.
_GRAY_MODES = ("1", "L", "LA")


@dataclass(kw_only=True)
class ImageFolder(Dataset):
    """Your own images: root/train/<class>/*.png|jpg|jpeg and root/test/<class>/... (classes = train's folders).

    Classes are the sub-folders of ``train/`` in sorted (string) order, label 0 first; hidden folders
    (``.ipynb_checkpoints``) and files directly under ``train/`` or ``test/`` are ignored, as are files
    of other types inside a class folder. ``test/`` must hold the same class folders or a subset of
    them. Images are read with PIL: one grayscale channel when every image (both splits) is
    grayscale (mode ``1``, ``L`` or ``LA``), else RGB for all (alpha dropped, grayscale images repeated on
    three channels). All images must share one size unless ``size=N`` resizes every image to NxN
    (bilinear, aspect ratio not kept). 16-bit and float images are refused. Both splits are
    normalised per channel with the training split's mean and std.

    The default model is ``mlp`` (it takes any shape: a dataset's default model is chosen before the
    images are read); pass ``--model cifar-cnn`` for 3x32x32 images or ``--model fmnist-cnn`` for
    1x28x28.
    """

    name: ClassVar[str] = "imagefolder"
    default_model: ClassVar[str] = "mlp"
    root: str = param("", "(required) folder holding train/<class>/ and test/<class>/ (as written; ~ expanded)")
    size: int = param(0, "resize every image to size x size (0: keep; then all images must share one size)",
                      check=NON_NEGATIVE)

    def __post_init__(self) -> None:
        super().__post_init__()
        _require_path(self, "root")

    def load(self, data_dir):
        root = Path(self.root).expanduser()
        layout = f"{root}/train/<class>/*.png|jpg|jpeg and {root}/test/<class>/..."
        if not root.is_dir():
            raise DataError(f"imagefolder: {root} is not a folder (expected {layout})")
        train = self._class_files(root, "train", layout)
        test = self._class_files(root, "test", layout)
        classes = sorted(train)
        extra = sorted(set(test) - set(classes))
        if extra:
            raise DataError(
                f"imagefolder: {root}/test/{extra[0]} is a class folder that {root}/train/ does not have "
                f"(test/ must hold the class folders of train/ or a subset: {', '.join(classes)})"
            )
        images, labels, n_train = [], [], 0
        first: tuple[Path, tuple[int, int]] | None = None
        for split, folders in (("train", train), ("test", test)):
            for label, cls in enumerate(classes):
                for path in folders.get(cls, ()):
                    array, size = self._read(path)
                    if not self.size:
                        if first is None:
                            first = (path, size)
                        elif size != first[1]:
                            raise DataError(
                                f"imagefolder: {path} is {size[0]}x{size[1]} but {first[0]} is "
                                f"{first[1][0]}x{first[1][1]}; all images must share one size "
                                f"(or pass imagefolder:root=...,size=N to resize every image to NxN)"
                            )
                    images.append(array)
                    labels.append(label)
                    n_train += split == "train"
        if any(a.shape[2] == 3 for a in images):
            images = [a if a.shape[2] == 3 else np.repeat(a, 3, axis=2) for a in images]
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
        y = torch.tensor(labels, dtype=torch.int64)
        trx, tex = _standardise(x[:n_train], x[n_train:])  # train images come first
        return DatasetTensors(trx, y[:n_train], tex, y[n_train:], num_classes=len(classes))

    @staticmethod
    def _class_files(root: Path, split: str, layout: str) -> dict[str, list[Path]]:
        folder = root / split
        if not folder.is_dir():
            raise DataError(f"imagefolder: no folder {folder} (expected {layout})")
        classes = {}
        for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
            files = sorted(p for p in sub.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                           and not p.name.startswith("."))
            if not files:
                raise DataError(f"imagefolder: no .png/.jpg/.jpeg images in {sub} (expected {sub}/*.png|jpg|jpeg)")
            classes[sub.name] = files
        if not classes:
            raise DataError(f"imagefolder: no class folders in {folder} (expected {folder}/<class>/*.png|jpg|jpeg)")
        return classes

    def _read(self, path: Path) -> tuple[np.ndarray, tuple[int, int]]:
        """One image as uint8 [H, W, 1] (grayscale) or [H, W, 3], and its original (width, height)."""
        from PIL import Image

        try:
            with Image.open(path) as img:
                img.load()
                if img.mode.startswith(("I", "F")):
                    raise DataError(f"imagefolder: {path} is a {img.mode} (16-bit or float) image; "
                                    "only 8-bit images are read (convert it to 8-bit)")
                size = img.size
                img = img.convert("L" if img.mode in _GRAY_MODES else "RGB")
                if self.size:
                    img = img.resize((self.size, self.size), Image.Resampling.BILINEAR)
                array = np.asarray(img, dtype=np.uint8)
        except DataError:
            raise
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            raise DataError(f"imagefolder: cannot read {path} as an image ({error})") from error
        return (array[:, :, None] if array.ndim == 2 else array), size


NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


@dataclass(kw_only=True)
class Npz(Dataset):
    """Your own arrays: an .npz file with x_train, y_train, x_test, y_test (integer labels 0..C-1).

    Images ``x_*`` are uint8 (divided by 255) or a float type (taken as they are, any range; NaN and
    infinity refused), in one of three layouts: ``[n, H, W]`` (one channel), ``[n, H, W, C]`` or
    ``[n, C, H, W]``. With ``layout=auto`` a 4-D array is channels-last when its last axis is 1 or 3
    and its axis 1 is not, channels-first in the opposite case; anything else (both or neither, e.g.
    RGBA) needs ``layout=nhwc`` or ``layout=nchw``. Labels ``y_*`` are an integer type, shape
    ``[n]`` or ``[n, 1]``; ``num_classes`` is the largest label of both splits plus one. The file is
    read with ``allow_pickle=False``: object arrays are refused, never unpickled. Both splits are
    normalised per channel with the training split's mean and std. The default model is ``mlp``
    (see ``imagefolder``).
    """

    name: ClassVar[str] = "npz"
    default_model: ClassVar[str] = "mlp"
    path: str = param("", "(required) the .npz file (as written; ~ expanded)")
    layout: str = param("auto", "axes of x_train / x_test", choices=("auto", "nhw", "nhwc", "nchw"))

    def __post_init__(self) -> None:
        super().__post_init__()
        _require_path(self, "path")

    def load(self, data_dir):
        import zipfile

        path = Path(self.path).expanduser()
        if not path.is_file():
            raise DataError(f"npz: no file {path} (expected an .npz archive with arrays {', '.join(NPZ_KEYS)})")
        try:
            archive = np.load(path, allow_pickle=False)
        except (OSError, ValueError, zipfile.BadZipFile) as error:
            raise DataError(f"npz: cannot read {path} as an .npz archive ({error})") from error
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise DataError(f"npz: {path} is a single .npy array, not an .npz archive with {', '.join(NPZ_KEYS)}")
        with archive:
            missing = [k for k in NPZ_KEYS if k not in archive.files]
            if missing:
                raise DataError(f"npz: {path} has no array '{missing[0]}' (expected {', '.join(NPZ_KEYS)}; "
                                f"it has: {', '.join(archive.files) or 'nothing'})")
            arrays = {}
            for key in NPZ_KEYS:
                try:
                    arrays[key] = archive[key]
                except (OSError, ValueError, zipfile.BadZipFile) as error:
                    raise DataError(f"npz: cannot read '{key}' from {path} ({error}); "
                                    "save plain numeric arrays (object arrays are never unpickled)") from error
        layout = self.layout if self.layout != "auto" else self._detect(arrays["x_train"], path)
        trx = self._images("x_train", arrays["x_train"], layout, path)
        tex = self._images("x_test", arrays["x_test"], layout, path)
        if trx.shape[1:] != tex.shape[1:]:
            raise DataError(f"npz: 'x_test' in {path} has images of shape {tuple(tex.shape[1:])} (C, H, W), "
                            f"'x_train' {tuple(trx.shape[1:])}; both splits must share one image shape")
        tr_y = self._labels("y_train", arrays["y_train"], len(trx), "x_train", path)
        te_y = self._labels("y_test", arrays["y_test"], len(tex), "x_test", path)
        num_classes = int(max(tr_y.max(), te_y.max())) + 1
        trx, tex = _standardise(trx, tex)
        return DatasetTensors(trx, tr_y, tex, te_y, num_classes=num_classes)

    @staticmethod
    def _detect(x: np.ndarray, path: Path) -> str:
        if x.ndim == 3:
            return "nhw"
        if x.ndim == 4:
            last, second = x.shape[3] in (1, 3), x.shape[1] in (1, 3)
            if last != second:
                return "nhwc" if last else "nchw"
            why = "both axis 1 and axis 3 could be" if last else "neither axis 1 nor axis 3 is"
            raise DataError(f"npz: 'x_train' in {path} has shape {x.shape}: {why} a channel axis of size 1 or 3; "
                            f"pass npz:path=...,layout=nhwc or layout=nchw")
        raise DataError(f"npz: 'x_train' in {path} has shape {x.shape}; expected [n, H, W], [n, H, W, C] or [n, C, H, W]")

    @staticmethod
    def _images(key: str, x: np.ndarray, layout: str, path: Path) -> torch.Tensor:
        ndim = 3 if layout == "nhw" else 4
        if x.ndim != ndim:
            raise DataError(f"npz: '{key}' in {path} has shape {x.shape}; layout {layout} needs {ndim} dimensions")
        if len(x) == 0:
            raise DataError(f"npz: '{key}' in {path} holds no images")
        if x.dtype == np.uint8:
            t = torch.from_numpy(x.astype(np.float32) / 255.0)
        elif np.issubdtype(x.dtype, np.floating):
            t = torch.from_numpy(x.astype(np.float32))
            if not torch.isfinite(t).all():
                raise DataError(f"npz: '{key}' in {path} holds NaN or infinite values")
        else:
            raise DataError(f"npz: '{key}' in {path} has dtype {x.dtype}; expected uint8 (0..255) or a float type")
        if layout == "nhw":
            t = t.unsqueeze(1)
        elif layout == "nhwc":
            t = t.permute(0, 3, 1, 2)
        return t.contiguous()

    @staticmethod
    def _labels(key: str, y: np.ndarray, n: int, x_key: str, path: Path) -> torch.Tensor:
        if not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"npz: '{key}' in {path} has dtype {y.dtype}; expected integer labels 0..C-1")
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if y.ndim != 1:
            raise DataError(f"npz: '{key}' in {path} has shape {y.shape}; expected [n] or [n, 1]")
        if len(y) != n:
            raise DataError(f"npz: '{key}' in {path} has {len(y)} labels but '{x_key}' has {n} images")
        if y.min() < 0:
            raise DataError(f"npz: '{key}' in {path} holds a negative label ({int(y.min())}); expected 0..C-1")
        return torch.from_numpy(y.astype(np.int64))


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
