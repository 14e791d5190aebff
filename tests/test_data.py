"""Datasets (offline loading, data-directory resolution, errors) and partitions among clients."""

from __future__ import annotations

from pathlib import Path
from urllib.error import URLError

import pytest
import torch
import torchvision
import torchvision.datasets.cifar
import torchvision.datasets.mnist

from fedbench import DataError, SpecError, parse_component
from fedbench.data import (IID, Cifar10, DirichletPartition, FashionMNIST, Shards, _torchvision_splits, load_dataset,
                           resolve_data_dir, take_fraction)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def balanced_labels(n_labels: int, per_label: int, seed: int = 0) -> torch.Tensor:
    """Each label ``per_label`` times, in a shuffled order (as a real training set would be)."""
    labels = torch.arange(n_labels).repeat_interleave(per_label)
    return labels[torch.randperm(len(labels), generator=gen(seed))]


def assert_disjoint_and_complete(parts: list[torch.Tensor], n: int) -> None:
    everything = torch.cat(parts)
    assert everything.dtype == torch.int64
    assert len(everything) == n, "indices lost or repeated"
    assert torch.equal(torch.sort(everything).values, torch.arange(n))


# --------------------------------------------------------------------------------------------------
# iid
# --------------------------------------------------------------------------------------------------
def test_iid_gives_near_equal_disjoint_shares_covering_every_index():
    labels = torch.randint(0, 10, (1003,), generator=gen(1))
    parts = IID().split(labels, 10, gen())
    assert len(parts) == 10
    assert sorted({len(p) for p in parts}) == [100, 101]
    assert_disjoint_and_complete(parts, 1003)


def test_iid_is_deterministic_for_a_generator_seed():
    labels = torch.zeros(200, dtype=torch.int64)
    a, b, c = (IID().split(labels, 4, gen(seed)) for seed in (3, 3, 4))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_iid_shares_mix_the_labels():
    labels = balanced_labels(10, 100)
    parts = IID().split(labels, 5, gen())
    assert all(len(torch.unique(labels[p])) == 10 for p in parts)


# --------------------------------------------------------------------------------------------------
# shards
# --------------------------------------------------------------------------------------------------
def test_shards_gives_each_client_at_most_two_labels_on_balanced_data():
    labels = balanced_labels(10, 100)
    parts = Shards(per_client=2).split(labels, 10, gen())
    assert [len(p) for p in parts] == [100] * 10
    assert all(len(torch.unique(labels[p])) <= 2 for p in parts)
    assert_disjoint_and_complete(parts, 1000)


def test_shards_reproduces_the_papers_fmnist_non_iid_split():
    """60,000 images, 100 clients, 200 shards of 300: every client gets 600 images of at most two labels."""
    labels = balanced_labels(10, 6000)
    parts = Shards().split(labels, 100, gen())
    assert {len(p) for p in parts} == {600}
    assert max(len(torch.unique(labels[p])) for p in parts) <= 2
    assert sum(len(torch.unique(labels[p])) == 2 for p in parts) > 50  # mostly two labels, as the paper says


def _label_runs(labels: torch.Tensor, part: torch.Tensor) -> int:
    """How many contiguous runs of the (stably) label-sorted order a client's indices form."""
    position = torch.empty_like(labels)
    position[torch.argsort(labels, stable=True)] = torch.arange(len(labels))
    pos = torch.sort(position[part]).values
    return 1 + int((pos[1:] - pos[:-1] != 1).sum())


@pytest.mark.parametrize("per_client", [1, 2, 3])
def test_shards_gives_each_client_at_most_per_client_label_runs(per_client):
    # unbalanced labels, so shards straddle label boundaries
    labels = torch.multinomial(torch.tensor([0.3, 0.05, 0.2, 0.15, 0.3]), 997, replacement=True, generator=gen(2))
    parts = Shards(per_client=per_client).split(labels, 7, gen())
    assert all(_label_runs(labels, p) <= per_client for p in parts)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= per_client  # shards differ by at most one index
    assert_disjoint_and_complete(parts, 997)


def test_shards_depend_on_the_generator_only():
    labels = balanced_labels(10, 50)
    a, b = Shards().split(labels, 5, gen(9)), Shards().split(labels, 5, gen(9))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


# --------------------------------------------------------------------------------------------------
# dirichlet
# --------------------------------------------------------------------------------------------------
def _mean_top_label_share(labels: torch.Tensor, parts: list[torch.Tensor]) -> float:
    shares = [torch.bincount(labels[p], minlength=10).max().item() / len(p) for p in parts]
    return sum(shares) / len(shares)


def test_dirichlet_is_disjoint_and_complete():
    labels = balanced_labels(10, 300)
    parts = DirichletPartition(alpha=0.5).split(labels, 8, gen())
    assert len(parts) == 8
    assert_disjoint_and_complete(parts, 3000)


def test_dirichlet_skews_labels_more_for_small_alpha():
    labels = balanced_labels(10, 1000)
    skewed = DirichletPartition(alpha=0.1).split(labels, 5, gen())
    even = DirichletPartition(alpha=100.0).split(labels, 5, gen())
    assert_disjoint_and_complete(skewed, 10_000)
    assert_disjoint_and_complete(even, 10_000)
    assert _mean_top_label_share(labels, even) < 0.2  # near the uniform 0.1
    assert _mean_top_label_share(labels, skewed) > _mean_top_label_share(labels, even) + 0.2
    assert all(len(torch.unique(labels[p])) == 10 for p in even)


def test_dirichlet_alpha_must_be_positive():
    with pytest.raises(SpecError, match="alpha"):
        DirichletPartition(alpha=0.0)


# --------------------------------------------------------------------------------------------------
# empty clients, data fraction
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "partition, name",
    [(IID(), "iid"), (Shards(), "shards"), (DirichletPartition(alpha=0.5), "dirichlet")],
)
def test_a_client_left_without_data_is_a_data_error(partition, name):
    labels = torch.tensor([0, 1, 2])
    with pytest.raises(DataError, match=f"partition '{name}' left .* without data"):
        partition.split(labels, 10, gen())


def test_take_fraction_keeps_the_first_ceil_of_each_clients_share():
    parts = [torch.arange(10), torch.arange(100, 107), torch.arange(5, 6), torch.arange(3), torch.arange(600)]
    kept = take_fraction(parts, 0.8)
    assert [len(p) for p in kept] == [8, 6, 1, 3, 480]  # ceil of 8, 5.6, 0.8, 2.4, 480
    for whole, part in zip(parts, kept):
        assert torch.equal(part, whole[: len(part)])


def test_take_fraction_keeps_at_least_one_index_and_everything_at_one():
    parts = [torch.arange(10), torch.arange(3)]
    assert [len(p) for p in take_fraction(parts, 0.01)] == [1, 1]
    assert take_fraction(parts, 1.0) is parts


def test_take_fraction_keeps_the_exact_share_when_it_is_whole():
    assert len(take_fraction([torch.arange(100)], 0.07)[0]) == 7


# --------------------------------------------------------------------------------------------------
# Data directory
# --------------------------------------------------------------------------------------------------
def test_data_dir_prefers_explicit_then_environment_then_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDBENCH_DATA_DIR", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert resolve_data_dir(tmp_path / "explicit") == tmp_path / "explicit"
    assert resolve_data_dir(None) == tmp_path / "env"
    monkeypatch.delenv("FEDBENCH_DATA_DIR")
    assert resolve_data_dir(None) == tmp_path / "cache" / "fedbench"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_data_dir(None) == tmp_path / "home" / ".cache" / "fedbench"


def _no_download(monkeypatch, cls):
    def refuse(self, *args, **kwargs):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(cls, "download", refuse)


def _no_network(monkeypatch):
    """Fail torchvision's downloads where they fetch, as a machine without network does: its own
    download() has already created the folders by then, and raises a multi-line error naming URLs."""
    def refuse(url, *args, **kwargs):
        raise URLError("network disabled in tests")

    monkeypatch.setattr(torchvision.datasets.mnist, "download_and_extract_archive", refuse)
    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", refuse)


def test_missing_fmnist_is_one_line_naming_the_folder_and_the_fix(monkeypatch, tmp_path):
    _no_network(monkeypatch)
    with pytest.raises(DataError) as err:
        FashionMNIST().load(str(tmp_path))
    message = str(err.value)
    assert "\n" not in message
    assert f"no FashionMNIST/raw/ under {tmp_path} (from --data-dir)" in message
    assert "set --data-dir or FEDBENCH_DATA_DIR to the folder that holds FashionMNIST/raw/" in message
    assert "connect to the network" in message
    assert "http" not in message and "urlopen" not in message and "network disabled" not in message
    assert isinstance(err.value.__cause__, RuntimeError)  # torchvision's own error stays chained, for debugging


def test_a_failed_download_creates_no_folder(monkeypatch, tmp_path):
    _no_network(monkeypatch)
    typo = tmp_path / "datsets"
    with pytest.raises(DataError, match=f"under {typo} \\(from --data-dir; it does not exist\\)"):
        FashionMNIST().load(str(typo))
    with pytest.raises(DataError):
        Cifar10().load(str(typo))
    assert not typo.exists()
    with pytest.raises(DataError):
        FashionMNIST().load(str(tmp_path))  # an existing, empty data folder stays empty
    assert list(tmp_path.iterdir()) == []


def test_missing_fmnist_under_the_environment_data_dir_names_that_folder(monkeypatch, tmp_path):
    _no_download(monkeypatch, torchvision.datasets.FashionMNIST)
    monkeypatch.setenv("FEDBENCH_DATA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="nowhere \\(from \\$FEDBENCH_DATA_DIR"):
        FashionMNIST().load(None)


def test_missing_cifar10_is_a_data_error_naming_where_it_looked(monkeypatch, tmp_path):
    _no_network(monkeypatch)
    with pytest.raises(DataError) as err:
        Cifar10().load(str(tmp_path))
    message = str(err.value)
    assert str(tmp_path) in message and "\n" not in message
    assert "cifar-10-batches-py" in message and "cifar10_jpeg_bytes.npz" in message


class FakeTorchvisionDataset:
    """Behaves like a torchvision dataset class: reads <root>/Fake/raw/data, or downloads it
    (creating the folders first and printing its URL, as torchvision does)."""

    def __init__(self, root, train=True, download=False):
        raw = Path(root) / "Fake" / "raw"
        if download and not (raw / "data").exists():
            print("Downloading https://example.invalid/data")
            raw.mkdir(parents=True, exist_ok=True)
            (raw / "data").write_text("pixels")
        if not (raw / "data").exists():
            raise RuntimeError("Dataset not found. You can use download=True to download it")
        self.root = root


def test_a_completed_download_lands_in_the_data_folder_and_prints_nothing_on_stdout(tmp_path, capsys):
    root = tmp_path / "new" / "data"
    train, test = _torchvision_splits(FakeTorchvisionDataset, "fake", root, "--data-dir", "Fake/raw/")
    assert (root / "Fake" / "raw" / "data").read_text() == "pixels"
    assert train.root == test.root == str(root)  # read from the data folder, not the staging one
    captured = capsys.readouterr()
    assert captured.out == "" and "Downloading" in captured.err  # stdout may be a --json document


# --------------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------------
def test_digits_loads_offline_with_the_documented_split():
    data = load_dataset(parse_component("dataset", "digits"))
    assert data.train_x.shape == (1497, 1, 8, 8) and data.test_x.shape == (300, 1, 8, 8)
    assert data.train_y.shape == (1497,) and data.test_y.shape == (300,)
    assert data.train_x.dtype == torch.float32 and data.train_y.dtype == torch.int64
    assert data.num_classes == 10
    assert set(data.train_y.tolist()) == set(range(10)) == set(data.test_y.tolist())
    # normalised with the training split's statistics
    assert abs(data.train_x.mean().item()) < 1e-4
    assert abs(data.train_x.std().item() - 1.0) < 1e-4


def test_digits_test_split_is_fixed_and_its_size_is_a_parameter():
    spec = parse_component("dataset", "digits")
    a, b = spec.build().load(None), spec.build().load(None)
    assert torch.equal(a.test_x, b.test_x) and torch.equal(a.train_y, b.train_y)
    bigger = parse_component("dataset", "digits:test_size=500").build().load(None)
    assert (len(bigger.train_y), len(bigger.test_y)) == (1297, 500)


def test_digits_test_size_leaving_no_training_images_is_a_data_error():
    with pytest.raises(DataError, match="no training images"):
        parse_component("dataset", "digits:test_size=1797").build().load(None)


def test_fmnist_loads_from_the_shared_folder(fmnist_dir):
    data = load_dataset(parse_component("dataset", "fmnist"), str(fmnist_dir))
    assert data.train_x.shape == (60000, 1, 28, 28) and data.test_x.shape == (10000, 1, 28, 28)
    assert data.train_x.dtype == torch.float32 and data.train_y.dtype == torch.int64
    assert data.num_classes == 10
    assert torch.bincount(data.train_y).tolist() == [6000] * 10
    assert torch.bincount(data.test_y).tolist() == [1000] * 10
    # normalised with MNIST's mean and std, as the authors' code does: undoing it gives pixels in [0, 1]
    pixels = data.train_x * 0.3081 + 0.1307
    assert abs(pixels.min().item()) < 1e-5 and abs(pixels.max().item() - 1.0) < 1e-5


def test_fmnist_shards_give_the_papers_two_label_clients(fmnist_dir):
    labels = load_dataset(parse_component("dataset", "fmnist"), str(fmnist_dir)).train_y
    parts = Shards().split(labels, 100, gen())
    assert {len(p) for p in parts} == {600}
    assert max(len(torch.unique(labels[p])) for p in parts) <= 2


@pytest.mark.slow
def test_cifar10_loads_from_the_offline_jpeg_copy(cifar_jpeg_dir):
    data = Cifar10().load(str(cifar_jpeg_dir))
    assert data.train_x.shape == (50000, 3, 32, 32) and data.test_x.shape == (10000, 3, 32, 32)
    assert torch.bincount(data.train_y).tolist() == [5000] * 10
    assert torch.bincount(data.test_y).tolist() == [1000] * 10
    pixels = data.train_x * 0.5 + 0.5  # the authors' mean = std = 0.5 normalisation, undone
    assert pixels.min().item() >= -1e-6 and pixels.max().item() <= 1 + 1e-6
