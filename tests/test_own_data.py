"""Bring your own data: the ``imagefolder`` and ``npz`` datasets (layouts, normalisation, errors, a run)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import fedbench
from fedbench import DataError, SpecError, parse_component
from fedbench.cli import main

#: the CIFAR-10 classes the image-folder fixture takes, and how many images of each per split
CLASSES = ("airplane", "automobile", "bird")
PER_CLASS = {"train": 30, "test": 10}


def load(spec: str):
    """Load a dataset spec without the process-wide cache (the tests rewrite files under one path)."""
    return parse_component("dataset", spec).build().load(None)


# --------------------------------------------------------------------------------------------------
# imagefolder on real images: a subset of the offline CIFAR-10 JPEG copy, as files
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cifar_folder(cifar_jpeg_dir, tmp_path_factory):
    """root/train/<class>/*.jpg and root/test/<class>/*.jpg: the first 30 / 10 images of three classes,
    written byte for byte as the archive holds them (no re-encoding)."""
    root = tmp_path_factory.mktemp("cifar-folder")
    with np.load(cifar_jpeg_dir / "cifar10-jpeg" / "cifar10_jpeg_bytes.npz") as z:
        names = [str(c) for c in z["classes"]]
        for split, count in PER_CLASS.items():
            buf, off, labels = z[f"{split}_jpeg"], z[f"{split}_offsets"], z[f"{split}_labels"]
            for cls in CLASSES:
                folder = root / split / cls
                folder.mkdir(parents=True)
                for n, i in enumerate(np.flatnonzero(labels == names.index(cls))[:count]):
                    (folder / f"{n:03d}.jpg").write_bytes(buf[off[i] : off[i + 1]].tobytes())
    return root


def test_imagefolder_reads_classes_from_the_train_folders_and_normalises_with_train_statistics(cifar_folder):
    data = load(f"imagefolder:root={cifar_folder}")
    assert data.train_x.shape == (90, 3, 32, 32) and data.test_x.shape == (30, 3, 32, 32)
    assert data.train_x.dtype == torch.float32 and data.train_y.dtype == torch.int64
    assert data.num_classes == 3
    assert torch.bincount(data.train_y).tolist() == [30, 30, 30]  # label = index of the sorted class folder
    assert torch.bincount(data.test_y).tolist() == [10, 10, 10]
    per_channel = data.train_x.transpose(0, 1).reshape(3, -1)
    assert per_channel.mean(1).abs().max() < 1e-4
    assert (per_channel.std(1) - 1).abs().max() < 1e-4


def test_imagefolder_decodes_each_image_as_pil_does(cifar_folder):
    data = load(f"imagefolder:root={cifar_folder}")
    raw = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted((cifar_folder / "train" / "bird").iterdir())])
    raw = torch.from_numpy(raw).permute(0, 3, 1, 2).float() / 255
    mine = data.train_x[data.train_y == 2]
    # undo the normalisation: the standardised birds are an affine image of the raw birds, per channel
    scale = mine.std(dim=(0, 2, 3)) / raw.std(dim=(0, 2, 3))
    shift = mine.mean(dim=(0, 2, 3)) - scale * raw.mean(dim=(0, 2, 3))
    assert torch.allclose(mine, raw * scale.view(1, 3, 1, 1) + shift.view(1, 3, 1, 1), atol=1e-4)


def test_imagefolder_runs_a_small_federation(cifar_folder):
    cell = fedbench.make_cell(dataset=f"imagefolder:root={cifar_folder}", rounds=3, num_clients=6,
                              clients_per_round=3, num_malicious=1, attack="signflip", attack_rounds=(2,))
    result = fedbench.run_cell(cell)
    assert result.status == "ok"
    assert len(result.rounds) == 3 and result.adversarial_rounds == [2]
    assert math.isfinite(result.final_accuracy) and 0.0 <= result.final_accuracy <= 1.0
    assert str(cifar_folder) in cell.dataset.canonical()  # the path is part of the spec, as written


def test_imagefolder_runs_through_the_cli_with_the_cifar_cnn(cifar_folder):
    result = CliRunner().invoke(main, ["run", "--dataset", f"imagefolder:root={cifar_folder}", "--model", "cifar-cnn",
                                       "--rounds", "2", "--clients", "6", "--per-round", "3", "--malicious", "0",
                                       "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["status"] == "ok" and math.isfinite(payload["final_accuracy"])
    assert payload["cell"]["model"]["name"] == "cifar-cnn"


def test_the_path_is_part_of_the_cells_identity_as_written(cifar_folder):
    a = fedbench.make_cell(dataset=f"imagefolder:root={cifar_folder}")
    b = fedbench.make_cell(dataset=f"imagefolder:root={cifar_folder}/")
    assert a.hash() == fedbench.make_cell(dataset=f"imagefolder:root={cifar_folder}").hash()
    assert a.hash() != b.hash()  # the same folder under another spelling is another cell


# --------------------------------------------------------------------------------------------------
# imagefolder on synthetic files: modes, sizes, errors
# --------------------------------------------------------------------------------------------------
def write_image(path, size=(8, 6), mode="RGB", value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    channels = {"RGB": (3,), "RGBA": (4,), "L": ()}[mode]
    pixels = rng.integers(0, 256, (size[1], size[0], *channels), dtype=np.uint8)
    Image.fromarray(pixels, mode).save(path)


def make_folder(root, classes=("a", "b"), test_classes=None, mode="RGB", size=(8, 6), per_class=2):
    for split, names in (("train", classes), ("test", classes if test_classes is None else test_classes)):
        for c, cls in enumerate(names):
            for i in range(per_class):
                write_image(root / split / cls / f"{i}.png", size, mode, value=10 * c + i)
    return root


def test_imagefolder_keeps_one_channel_when_every_image_is_grayscale(tmp_path):
    data = load(f"imagefolder:root={make_folder(tmp_path, mode='L')}")
    assert data.train_x.shape == (4, 1, 6, 8)


def test_imagefolder_reads_everything_as_rgb_when_any_image_is_in_colour(tmp_path):
    make_folder(tmp_path, mode="L")
    write_image(tmp_path / "test" / "b" / "rgba.png", mode="RGBA")
    data = load(f"imagefolder:root={tmp_path}")
    assert data.train_x.shape == (4, 3, 6, 8) and data.test_x.shape == (5, 3, 6, 8)
    gray = data.train_x[0]
    assert torch.allclose((gray[0] - gray[0].mean()) / gray[0].std(), (gray[2] - gray[2].mean()) / gray[2].std(),
                          atol=1e-5)  # a grayscale image is repeated on the three channels


def test_imagefolder_test_split_may_hold_a_subset_of_the_classes(tmp_path):
    data = load(f"imagefolder:root={make_folder(tmp_path, classes=('a', 'b', 'c'), test_classes=('c',))}")
    assert data.num_classes == 3 and data.test_y.tolist() == [2, 2]


def test_imagefolder_ignores_hidden_folders_and_other_files(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "train" / ".ipynb_checkpoints").mkdir()
    (tmp_path / "train" / "labels.csv").write_text("x")
    (tmp_path / "train" / "a" / "notes.txt").write_text("x")
    data = load(f"imagefolder:root={tmp_path}")
    assert data.num_classes == 2 and len(data.train_y) == 4


def test_imagefolder_resizes_only_when_asked(tmp_path):
    make_folder(tmp_path)
    write_image(tmp_path / "train" / "b" / "big.jpg", size=(20, 12))
    with pytest.raises(DataError, match=r"big\.jpg is 20x12 but .*0\.png is 8x6; all images must share one size"):
        load(f"imagefolder:root={tmp_path}")
    data = load(f"imagefolder:root={tmp_path},size=16")
    assert data.train_x.shape == (5, 3, 16, 16)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda root: None, "is not a folder"),
        (lambda root: make_folder(root, test_classes=()) and None, "no folder {root}/test \\(expected"),
        (lambda root: (root / "train").mkdir(parents=True) or (root / "test").mkdir(),
         "no class folders in {root}/train \\(expected {root}/train/<class>/\\*.png"),
        (lambda root: make_folder(root) and (root / "train" / "c").mkdir(), "no .png/.jpg/.jpeg images in {root}/train/c"),
        (lambda root: make_folder(root, classes=("a", "b"), test_classes=("a", "z")),
         "{root}/test/z is a class folder that {root}/train/ does not have"),
        (lambda root: make_folder(root) and (root / "test" / "a" / "1.png").write_bytes(b"not a png"),
         "cannot read {root}/test/a/1.png as an image"),
    ],
    ids=["missing-root", "missing-test", "no-classes", "empty-class",
         "unknown-test-class", "unreadable-file"],
)
def test_imagefolder_errors_say_what_was_expected_where(tmp_path, damage, message):
    root = tmp_path / "mine"
    damage(root)
    with pytest.raises(DataError, match=message.format(root=root)) as err:
        load(f"imagefolder:root={root}")
    assert "\n" not in str(err.value)


def test_imagefolder_missing_train_folder_is_a_data_error(tmp_path):
    (tmp_path / "test" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match=f"no folder {tmp_path}/train \\(expected {tmp_path}/train/<class>/"):
        load(f"imagefolder:root={tmp_path}")


def test_imagefolder_refuses_16_bit_images(tmp_path):
    make_folder(tmp_path, mode="L")
    Image.fromarray(np.full((6, 8), 40000, dtype=np.uint16)).save(tmp_path / "train" / "a" / "deep.png")
    with pytest.raises(DataError, match="deep.png is a I.* image; only 8-bit"):
        load(f"imagefolder:root={tmp_path}")


@pytest.mark.parametrize("spec", ["imagefolder", "npz"])
def test_the_path_is_required_when_the_spec_is_parsed(spec):
    with pytest.raises(SpecError, match=r"parameter '(root|path)' is required: (imagefolder:root|npz:path)=PATH"):
        parse_component("dataset", spec)
    with pytest.raises(SpecError, match="is required"):
        fedbench.registry().get("dataset", spec)(**{"root" if spec == "imagefolder" else "path": "  "})


# --------------------------------------------------------------------------------------------------
# npz
# --------------------------------------------------------------------------------------------------
def structured(n: int, shape: tuple[int, ...], n_classes: int = 4, seed: int = 0):
    """uint8 images whose brightness is their label, and the labels."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % n_classes
    x = (rng.integers(0, 40, (n, *shape)) + 50 * y.reshape(-1, *[1] * len(shape))).astype(np.uint8)
    return x, y


def write_npz(path, **arrays):
    defaults = dict(zip(("x_train", "y_train"), structured(40, (6, 5))))
    defaults.update(zip(("x_test", "y_test"), structured(12, (6, 5), seed=1)))
    defaults.update(arrays)
    np.savez(path, **{k: v for k, v in defaults.items() if v is not None})
    return path


LAYOUTS = {"nhw": lambda x: x[:, 0], "nhwc": lambda x: x.transpose(0, 2, 3, 1), "nchw": lambda x: x}


@pytest.mark.parametrize("layout, channels", [("nhw", 1), ("nhwc", 1), ("nhwc", 3), ("nchw", 1), ("nchw", 3)])
def test_npz_accepts_each_layout_and_detects_the_channel_axis(tmp_path, layout, channels):
    to_file = LAYOUTS[layout]
    x, y = structured(40, (channels, 6, 5))
    xt, yt = structured(12, (channels, 6, 5), seed=1)
    path = write_npz(tmp_path / "d.npz", x_train=to_file(x), y_train=y, x_test=to_file(xt), y_test=yt)
    for spec in (f"npz:path={path}", f"npz:path={path},layout={layout}"):
        data = load(spec)
        assert data.train_x.shape == (40, channels, 6, 5) and data.test_x.shape == (12, channels, 6, 5)
        assert data.num_classes == 4 and data.train_y.tolist() == y.tolist() and data.test_y.dtype == torch.int64
        # the same pixels in [n, C, H, W] order, normalised per channel with the train split's statistics
        expected = torch.from_numpy(x).float() / 255
        mean, std = expected.mean(dim=(0, 2, 3)).view(1, -1, 1, 1), expected.std(dim=(0, 2, 3)).view(1, -1, 1, 1)
        assert torch.allclose(data.train_x, (expected - mean) / std, atol=1e-5)
        assert torch.allclose(data.test_x, (torch.from_numpy(xt).float() / 255 - mean) / std, atol=1e-5)


def test_npz_takes_float_images_as_they_are_and_labels_of_shape_n_by_1(tmp_path):
    x, y = structured(40, (6, 5))
    path = write_npz(tmp_path / "d.npz", x_train=x.astype(np.float64) * 3.0, y_train=y.reshape(-1, 1).astype(np.uint8),
                     x_test=x[:12].astype(np.float32), y_test=y[:12].astype(np.int16))
    data = load(f"npz:path={path}")
    assert data.train_x.shape == (40, 1, 6, 5) and data.train_x.dtype == torch.float32
    assert abs(data.train_x.mean().item()) < 1e-5 and abs(data.train_x.std().item() - 1) < 1e-5
    assert data.train_y.tolist() == y.tolist()


def test_npz_num_classes_is_the_largest_label_of_both_splits_plus_one(tmp_path):
    path = write_npz(tmp_path / "d.npz", y_test=np.full(12, 9))
    assert load(f"npz:path={path}").num_classes == 10


def test_npz_runs_a_small_federation(tmp_path):
    path = write_npz(tmp_path / "d.npz", **dict(zip(("x_train", "y_train"), structured(120, (6, 5)))))
    cell = fedbench.make_cell(dataset=f"npz:path={path}", rounds=3, num_clients=4, clients_per_round=2, num_malicious=0,
                              lr=0.1)
    result = fedbench.run_cell(cell)
    assert result.status == "ok" and math.isfinite(result.final_accuracy)


@pytest.mark.parametrize(
    "arrays, message",
    [
        (dict(x_test=None), "has no array 'x_test' \\(expected x_train, y_train, x_test, y_test; it has: x_train, y_train, y_test\\)"),
        (dict(y_train=np.arange(40) * 0.5), "'y_train' in .* has dtype float64; expected integer labels"),
        (dict(x_train=np.zeros((40, 6, 5), dtype=np.int64)), "'x_train' in .* has dtype int64; expected uint8"),
        (dict(y_test=np.zeros(11, dtype=int)), "'y_test' in .* has 11 labels but 'x_test' has 12 images"),
        (dict(y_train=-np.ones(40, dtype=int)), "'y_train' in .* holds a negative label"),
        (dict(x_test=np.zeros((12, 5, 6), dtype=np.uint8)), "'x_test' in .* has images of shape \\(1, 5, 6\\)"),
        (dict(x_test=np.zeros((12, 6, 5, 1), dtype=np.uint8)), "'x_test' in .* has shape \\(12, 6, 5, 1\\); layout nhw needs 3"),
        (dict(x_train=np.full((40, 6, 5), np.nan)), "'x_train' in .* holds NaN or infinite values"),
        (dict(x_train=np.zeros((40, 30), dtype=np.uint8)), "'x_train' in .* has shape \\(40, 30\\); expected \\[n, H, W\\]"),
        (dict(x_train=np.zeros((40, 3, 6, 3), dtype=np.uint8)), "both axis 1 and axis 3 could be a channel axis.*layout=nhwc"),
        (dict(x_train=np.zeros((40, 6, 5, 4), dtype=np.uint8)), "neither axis 1 nor axis 3 is a channel axis"),
        (dict(x_train=np.zeros((0, 6, 5), dtype=np.uint8), y_train=np.zeros(0, dtype=int)), "'x_train' in .* holds no images"),
    ],
    ids=["missing-key", "float-labels", "int64-images", "length-mismatch", "negative-label", "shape-mismatch",
         "ndim-mismatch", "nan", "flat-images", "ambiguous-channels", "no-channel-axis", "empty"],
)
def test_npz_errors_name_the_array_and_the_problem(tmp_path, arrays, message):
    path = write_npz(tmp_path / "d.npz", **arrays)
    with pytest.raises(DataError, match=message) as err:
        load(f"npz:path={path}")
    assert "\n" not in str(err.value)


def test_npz_explicit_layout_reads_four_channel_images(tmp_path):
    path = write_npz(tmp_path / "d.npz", x_train=np.zeros((40, 6, 5, 4), dtype=np.uint8),
                     x_test=np.ones((12, 6, 5, 4), dtype=np.uint8))
    assert load(f"npz:path={path},layout=nhwc").train_x.shape == (40, 4, 6, 5)


def test_npz_never_unpickles_object_arrays(tmp_path):
    path = write_npz(tmp_path / "d.npz", y_train=np.array([object()] * 40, dtype=object))
    with pytest.raises(DataError, match="cannot read 'y_train' from .*object arrays are never unpickled"):
        load(f"npz:path={path}")


@pytest.mark.parametrize(
    "content, message",
    [(None, "no file {path} \\(expected an .npz archive"), (b"garbage", "cannot read {path} as an .npz archive")],
    ids=["missing", "not-an-archive"],
)
def test_npz_missing_or_unreadable_file_is_one_line(tmp_path, content, message):
    path = tmp_path / "d.npz"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=message.format(path=path)) as err:
        load(f"npz:path={path}")
    assert "\n" not in str(err.value)


def test_npz_single_array_file_is_refused(tmp_path):
    path = tmp_path / "d.npz"
    with open(path, "wb") as f:
        np.save(f, np.zeros(3))
    with pytest.raises(DataError, match="is a single .npy array, not an .npz archive"):
        load(f"npz:path={path}")
