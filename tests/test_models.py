"""Model architectures (the paper's CNNs, table 3 / reference section 6) and the flat-parameter view."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedbench import SpecError, parse_component
from fedbench.models import CifarCNN, FmnistCNN, MLP
from fedbench.training import FlatModel


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_fmnist_cnn_is_the_papers_model_with_28938_parameters():
    model = FmnistCNN().build((1, 28, 28), 10)
    assert n_params(model) == 28_938
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [(1, 16, (5, 5)), (16, 32, (5, 5))]
    (fc,) = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert (fc.in_features, fc.out_features) == (1568, 10)


def test_fmnist_cnn_maps_a_batch_of_images_to_ten_logits():
    model = FmnistCNN().build((1, 28, 28), 10)
    assert model(torch.randn(5, 1, 28, 28)).shape == (5, 10)


def test_cifar_cnn_is_the_papers_model_with_62006_parameters():
    model = CifarCNN().build((3, 32, 32), 10)
    assert n_params(model) == 62_006
    fcs = [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)]
    assert fcs == [(400, 120), (120, 84), (84, 10)]


def test_cifar_cnn_maps_a_batch_of_images_to_ten_logits():
    model = CifarCNN().build((3, 32, 32), 10)
    assert model(torch.randn(4, 3, 32, 32)).shape == (4, 10)


@pytest.mark.parametrize(
    "name, shape, expected",
    [("fmnist-cnn", (3, 32, 32), "(1, 28, 28)"), ("fmnist-cnn", (1, 8, 8), "(1, 28, 28)"),
     ("cifar-cnn", (1, 28, 28), "(3, 32, 32)")],
)
def test_cnn_given_the_wrong_input_shape_is_a_spec_error(name, shape, expected):
    model = parse_component("model", name).build()
    with pytest.raises(SpecError) as err:
        model.build(shape, 10)
    assert f"model '{name}' expects inputs of shape {expected}" in str(err.value)
    assert str(shape) in str(err.value)


def test_mlp_fits_any_input_shape_and_class_count():
    model = MLP(hidden=16).build((1, 8, 8), 3)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 3)
    assert n_params(model) == 64 * 16 + 16 + 16 * 3 + 3
    assert n_params(MLP().build((1, 8, 8), 10)) == 64 * 64 + 64 + 64 * 10 + 10  # default width 64


def test_mlp_width_must_be_positive():
    with pytest.raises(SpecError, match="hidden"):
        parse_component("model", "mlp:hidden=0")


def test_each_build_is_a_fresh_module():
    spec = parse_component("model", "mlp")
    a, b = spec.build().build((1, 8, 8), 10), spec.build().build((1, 8, 8), 10)
    assert a is not b
    a[1].weight.data.zero_()
    assert b[1].weight.abs().sum() > 0


# --------------------------------------------------------------------------------------------------
# FlatModel: a module as a function of one flat parameter vector
# --------------------------------------------------------------------------------------------------
def test_flat_model_forward_matches_the_module():
    module = FmnistCNN().build((1, 28, 28), 10)
    flat_model = FlatModel(module)
    flat = flat_model.flatten()
    assert flat.shape == (28_938,) == (flat_model.num_params,)
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(flat_model.forward(flat)(x), module(x))


def test_flat_model_split_and_join_round_trip_with_a_client_axis():
    flat_model = FlatModel(CifarCNN().build((3, 32, 32), 10))
    stacked = torch.randn(4, flat_model.num_params)
    tensors = flat_model.split(stacked)
    assert [tuple(t.shape[1:]) for t in tensors] == flat_model.shapes
    assert all(t.shape[0] == 4 for t in tensors)
    assert torch.equal(flat_model.join(tensors, lead=1), stacked)


def test_flat_model_marks_conv_and_linear_weights_but_not_biases():
    flat_model = FlatModel(FmnistCNN().build((1, 28, 28), 10))
    assert dict(zip(flat_model.names, flat_model.is_weight)) == {
        "0.weight": True, "0.bias": False, "3.weight": True, "3.bias": False, "7.weight": True, "7.bias": False,
    }
