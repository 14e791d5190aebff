"""FL-WBC (plugins/wbc.py), as reference section 3 defines it.

Per benign client and local SGD iteration i >= 1 of an epoch: a Hessian-diagonal proxy P (gradient
difference g_i - g_(i-1) by default, update difference dW_i - dW_(i-1) with ``proxy=update``), a draw
Y ~ Laplace(0, s) keyed by the client's defense key and ("wbc", epoch, step), the mask |P| <= |Y|
(|P| <= lr |Y| for the update proxy), and W <- W + lr * Y * mask on conv/linear weights only.

The hand-built tests construct ``fedbench.StepState`` directly and recompute the expected draws one
client at a time with ``fedbench.rng.laplace_keyed`` (the client's weight tensors laid end to end);
nothing here is copied from a run.
"""

from __future__ import annotations

import math

import pytest
import torch

import fedbench
from fedbench import rng
from fedbench.models import FmnistCNN
from fedbench.rng import laplace_keyed
from fedbench.training import ClientJob, FlatModel, LocalSetup, LoopTrainer, StackedTrainer
from fedbench_plugins.poison import Poison
from fedbench_plugins.wbc import WBC

C = 2  # clients in the hand-built steps
#: (shape without the client axis, is_weight): a linear weight, its bias, a conv weight, its bias.
#: Biases sit between weights so that a bias that consumed draws would shift every later weight's noise.
LAYOUT = [((3, 5), True), ((3,), False), ((4, 2, 2, 2), True), ((4,), False)]
KEYS = (rng.derive_seed(0, "defense", 1, 0), rng.derive_seed(0, "defense", 1, 1))  # client 0 and client 1


def keys_of(keys=KEYS) -> torch.Tensor:
    return torch.tensor(keys, dtype=torch.int64)


def rand(shape, seed, scale=1.0):
    return scale * torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def hand_state(*, lr=0.1, proxy_scale=1.0, prev=True, active=(True, True), keys=KEYS, updates=None,
               prev_updates=None) -> fedbench.StepState:
    """A step of C=2 clients with known tensors.

    ``prev_grads`` are large random values; ``grads = prev_grads + proxy`` with |proxy| spread over
    [0, proxy_scale), so the gradient difference (not the gradients themselves) decides the mask,
    and with s = 0.4 about a third of the elements are perturbed.
    """
    params, grads, prev_grads = [], [], []
    for k, (shape, _) in enumerate(LAYOUT):
        full = (C, *shape)
        params.append(rand(full, 100 + k))
        base = rand(full, 200 + k, scale=5.0)
        sign = torch.where(rand(full, 300 + k) > 0, 1.0, -1.0)
        proxy = sign * proxy_scale * torch.rand(full, generator=torch.Generator().manual_seed(400 + k))
        grads.append(base + proxy)
        prev_grads.append(base)
    if updates is None:
        updates = [-lr * g for g in grads]  # plain SGD
        prev_updates = [-lr * g for g in prev_grads]
    return fedbench.StepState(
        step=1 if prev else 0, epoch=0, lr=lr, params=params, grads=grads, updates=updates,
        prev_grads=prev_grads if prev else None, prev_updates=prev_updates if prev else None,
        is_weight=[w for _, w in LAYOUT], keys=keys_of(keys), active=torch.tensor(active),
    )


def clone(tensors):
    return [t.clone() for t in tensors]


def expected_noise(s, keys=KEYS, epoch=0, step=1) -> list[list[torch.Tensor]]:
    """Per client, drawn alone: the Laplace draws of its weight tensors, which take consecutive
    elements of one draw in layout order (biases take none)."""
    total = sum(math.prod(shape) for shape, w in LAYOUT if w)
    out = []
    for key in keys:
        flat = laplace_keyed(keys_of([key]), ("wbc", epoch, step), (total,), s)[0]
        row, offset = [], 0
        for shape, w in LAYOUT:
            row.append(flat[offset : offset + math.prod(shape)].view(shape) if w else None)
            offset += math.prod(shape) if w else 0
        out.append(row)
    return out


def assert_perturbed_exactly(before, after, noise, mask, lr):
    """Unmasked elements bit-for-bit unchanged; masked ones moved by lr * Y (to float rounding)."""
    assert torch.equal(after[~mask], before[~mask])
    torch.testing.assert_close(after[mask], before[mask] + lr * noise[mask], rtol=1e-6, atol=1e-8)


# --------------------------------------------------------------------------------------------------
# The mask
# --------------------------------------------------------------------------------------------------
def test_only_elements_whose_gradient_difference_is_within_the_draw_move_by_lr_times_the_draw():
    s, lr = 0.4, 0.1
    state = hand_state(lr=lr)
    before = clone(state.params)
    WBC(s=s).after_step(state)
    noise = expected_noise(s)
    n_masked = n_kept = 0
    for k, (_, is_weight) in enumerate(LAYOUT):
        if not is_weight:
            continue
        for c in range(C):
            proxy = state.grads[k][c] - state.prev_grads[k][c]
            y = noise[c][k]
            mask = proxy.abs() <= y.abs()
            assert_perturbed_exactly(before[k][c], state.params[k][c], y, mask, lr)
            n_masked += int(mask.sum())
            n_kept += int((~mask).sum())
    # the hand-built proxy makes the mask non-trivial: both outcomes occur
    assert n_masked > 5 and n_kept > 5


def test_an_element_with_zero_proxy_is_always_perturbed_and_a_huge_one_never():
    s, lr = 0.4, 0.1
    state = hand_state(lr=lr, proxy_scale=0.0)  # grads == prev_grads: |P| = 0 <= |Y|
    before = clone(state.params)
    WBC(s=s).after_step(state)
    noise = expected_noise(s)
    for k in (0, 2):
        for c in range(C):
            torch.testing.assert_close(state.params[k][c] - before[k][c], lr * noise[c][k], rtol=1e-5, atol=1e-7)

    state = hand_state(lr=lr, proxy_scale=0.0)
    state.grads = [g + 1e3 for g in state.grads]  # |P| = 1000: a Laplace(0.4) draw never gets there
    before = clone(state.params)
    WBC(s=s).after_step(state)
    for b, a in zip(before, state.params):
        assert torch.equal(a, b)


def test_biases_never_change():
    state = hand_state(proxy_scale=0.0)  # every element would be perturbed if it were a weight
    before = clone(state.params)
    WBC(s=1.0).after_step(state)
    for k, (_, is_weight) in enumerate(LAYOUT):
        if not is_weight:
            assert torch.equal(state.params[k], before[k])
        else:
            assert not torch.equal(state.params[k], before[k])


def test_the_first_step_of_an_epoch_changes_nothing():
    state = hand_state(prev=False, proxy_scale=0.0)
    assert state.prev_grads is None and state.prev_updates is None
    before = clone(state.params)
    WBC(s=1.0).after_step(state)
    for b, a in zip(before, state.params):
        assert torch.equal(a, b)


def test_an_inactive_client_is_untouched_and_the_active_one_gets_its_own_noise():
    s, lr = 0.4, 0.1
    state = hand_state(lr=lr, active=(True, False))
    before = clone(state.params)
    WBC(s=s).after_step(state)
    for k in range(len(LAYOUT)):
        assert torch.equal(state.params[k][1], before[k][1])
    # the active client gets exactly what it would get alone, or with both clients active
    noise = expected_noise(s)
    for k in (0, 2):
        mask = (state.grads[k][0] - state.prev_grads[k][0]).abs() <= noise[0][k].abs()
        assert_perturbed_exactly(before[k][0], state.params[k][0], noise[0][k], mask, lr)


def test_each_client_draws_from_its_own_key():
    """Swapping the clients' keys swaps their noise: client c's draw depends on its key only."""
    s = 0.4
    a = hand_state(proxy_scale=0.0)
    b = hand_state(proxy_scale=0.0, keys=KEYS[::-1])
    before = clone(a.params)
    WBC(s=s).after_step(a)
    WBC(s=s).after_step(b)
    torch.testing.assert_close(b.params[0][0] - before[0][0], a.params[0][1] - before[0][1], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(b.params[0][1] - before[0][1], a.params[0][0] - before[0][0], rtol=1e-5, atol=1e-7)
    expected = expected_noise(s, KEYS[::-1])
    torch.testing.assert_close(b.params[0][0] - before[0][0], a.lr * expected[0][0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(b.params[0][1] - before[0][1], a.lr * expected[1][0], rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------------------------------
# proxy=update
# --------------------------------------------------------------------------------------------------
def test_update_proxy_compares_the_update_difference_with_lr_times_the_draw():
    s, lr = 0.4, 0.05
    # updates unrelated to the gradients; grads == prev_grads, so the gradient proxy would perturb everything
    updates, prev_updates = [], []
    for k, (shape, _) in enumerate(LAYOUT):
        prev_u = rand((C, *shape), 500 + k, scale=lr)
        diff = lr * torch.rand((C, *shape), generator=torch.Generator().manual_seed(600 + k))
        updates.append(prev_u + diff)
        prev_updates.append(prev_u)
    state = hand_state(lr=lr, proxy_scale=0.0, updates=updates, prev_updates=prev_updates)
    before = clone(state.params)
    WBC(s=s, proxy="update").after_step(state)
    noise = expected_noise(s)
    n_masked = n_kept = 0
    for k in (0, 2):
        for c in range(C):
            mask = (updates[k][c] - prev_updates[k][c]).abs() <= lr * noise[c][k].abs()
            assert_perturbed_exactly(before[k][c], state.params[k][c], noise[c][k], mask, lr)
            n_masked += int(mask.sum())
            n_kept += int((~mask).sum())
    assert n_masked > 5 and n_kept > 5
    for k in (1, 3):
        assert torch.equal(state.params[k], before[k])


def test_with_plain_sgd_the_update_proxy_gives_the_same_mask_as_the_gradient_proxy():
    s, lr = 0.4, 0.1
    by_grad = hand_state(lr=lr)  # updates = -lr * grads: plain SGD
    by_update = hand_state(lr=lr)
    before = clone(by_grad.params)
    WBC(s=s, proxy="grad").after_step(by_grad)
    WBC(s=s, proxy="update").after_step(by_update)
    for k in (0, 2):
        moved_g = by_grad.params[k] != before[k]
        moved_u = by_update.params[k] != before[k]
        assert torch.equal(moved_g, moved_u)
        assert 0 < int(moved_g.sum()) < moved_g.numel()
        torch.testing.assert_close(by_update.params[k], by_grad.params[k], rtol=0, atol=1e-7)


def test_with_momentum_the_two_proxies_differ_in_training():
    """With plain SGD the two proxies train identically; with momentum dW != -lr g and they part."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = FlatModel(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)))
    x = rand((64, 1, 4, 4), 1)
    y = torch.randint(0, 3, (64,), generator=torch.Generator().manual_seed(2))
    flat = model.flatten()

    def run(proxy, momentum):
        job = ClientJob(x, y, batch_gen=rng.generator(0, "train", 1, 0), defense_key=rng.derive_seed(0, "defense", 1, 0))
        setup = LocalSetup(epochs=2, batch_size=8, lr=0.1, momentum=momentum)
        return LoopTrainer(model).train(flat, [job], setup, defenses=[WBC(s=0.4, proxy=proxy)])

    torch.testing.assert_close(run("update", 0.0), run("grad", 0.0), rtol=0, atol=1e-6)
    assert (run("update", 0.5) - run("grad", 0.5)).abs().max() > 1e-4


# --------------------------------------------------------------------------------------------------
# Noise scale and parameters
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("s", [0.1, 0.4, 1.0])
def test_the_perturbation_is_laplace_with_scale_s(s):
    """With zero proxy and lr = 1 the perturbation is the draw itself: E|Y| = s, std = sqrt(2) s."""
    n = 200_000
    state = fedbench.StepState(
        step=1, epoch=0, lr=1.0, params=[torch.zeros(C, n)], grads=[torch.ones(C, n)],
        updates=[-torch.ones(C, n)], prev_grads=[torch.ones(C, n)], prev_updates=[-torch.ones(C, n)],
        is_weight=[True], keys=keys_of(), active=torch.tensor([True, True]),
    )
    WBC(s=s).after_step(state)
    for c in range(C):
        y = state.params[0][c]
        assert y.abs().mean().item() == pytest.approx(s, rel=0.05)
        assert y.std().item() == pytest.approx(math.sqrt(2) * s, rel=0.05)
        assert abs(y.mean().item()) < 0.05 * s
    assert not torch.equal(state.params[0][0], state.params[0][1])  # independent client noise


@pytest.mark.parametrize("text, name", [("wbc:s=0", "s"), ("wbc:s=-0.4", "s"), ("wbc:proxy=foo", "proxy")])
def test_bad_parameters_are_spec_errors_naming_the_parameter(text, name):
    with pytest.raises(fedbench.SpecError, match=f"'{name}'"):
        fedbench.parse_defense(text)
    with pytest.raises(fedbench.SpecError, match=f"'{name}'"):
        fedbench.make_cell(dataset="digits", defense=text)


def test_defaults_are_the_papers_headline_strength_and_the_codes_proxy():
    spec = fedbench.parse_defense("wbc")
    assert dict(spec.client[0].params) == {"s": 0.4, "proxy": "grad"}
    assert spec.aggregator.name == "fedavg"


# --------------------------------------------------------------------------------------------------
# In training and in a run
# --------------------------------------------------------------------------------------------------
def assert_trainers_agree_with_wbc(module, input_shape, proxy):
    """Loop and stacked trainers, three clients of unequal sizes, momentum, two epochs, WBC on:
    the same updates within 1e-4 -- also with the stacked trainer's chunks of one and of two, and
    with the three clients trained in one batch among eight others (their noise must not depend on
    their batch-mates); and WBC really acted (far from the unperturbed updates)."""
    model = FlatModel(module)
    flat = model.flatten()
    sizes = (6, 3, 7)  # batch 2: 3, 2 and 4 steps per epoch (the last ones partial); the middle client sits out steps
    data = [(rand((n, *input_shape), 10 + c), torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(20 + c)))
            for c, n in enumerate(sizes)]
    setup = LocalSetup(epochs=2, batch_size=2, lr=0.05, momentum=0.5)

    def jobs(clients=range(len(sizes))):
        return [ClientJob(*data[c % len(data)], batch_gen=rng.generator(3, "train", 1, c), defense_key=rng.derive_seed(3, "defense", 1, c))
                for c in clients]

    wbc = [WBC(s=0.4, proxy=proxy)]
    loop = LoopTrainer(model).train(flat, jobs(), setup, defenses=wbc)
    stacked = StackedTrainer(model).train(flat, jobs(), setup, defenses=wbc)
    assert (stacked - loop).abs().max().item() < 1e-4
    for chunk in (1, 2):
        chunked = StackedTrainer(model, chunk=chunk).train(flat, jobs(), setup, defenses=wbc)
        assert (chunked - loop).abs().max().item() < 1e-4
    crowd = StackedTrainer(model, chunk=11).train(flat, jobs([5, 0, 6, 7, 1, 8, 9, 2, 10, 3, 4]), setup, defenses=wbc)
    assert (crowd[[1, 4, 7]] - loop).abs().max().item() < 1e-4
    plain = StackedTrainer(model).train(flat, jobs(), setup)
    assert (stacked - plain).abs().max().item() > 1e-3


def test_loop_and_stacked_trainers_agree_with_wbc_on_the_fmnist_cnn_with_unequal_clients():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        module = FmnistCNN().build((1, 28, 28), 10)
    assert_trainers_agree_with_wbc(module, (1, 28, 28), "grad")


@pytest.mark.parametrize("proxy", ["grad", "update"])
def test_loop_and_stacked_trainers_agree_with_wbc_on_an_mlp_with_unequal_clients(proxy):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 12), torch.nn.ReLU(), torch.nn.Linear(12, 10))
    assert_trainers_agree_with_wbc(module, (1, 4, 4), proxy)


def _record_wbc_rows(monkeypatch):
    """Wrap WBC.after_step: per round, the number of client rows of every call."""
    rows: list[list[int]] = [[]]
    original = WBC.after_step

    def recording(self, state):
        rows[-1].append(int(state.params[0].shape[0]))
        return original(self, state)

    monkeypatch.setattr(WBC, "after_step", recording)
    return rows


def test_wbc_never_runs_in_malicious_clients(monkeypatch):
    rows = _record_wbc_rows(monkeypatch)
    # K = 8, M = 5: an adversarial round has 3 benign clients, so 3 rows cannot be mistaken for the 5
    # malicious ones; lam < 1 gives the malicious clients several steps per epoch on their own data
    cell = fedbench.make_cell(dataset="digits", attack="poison:lam=0.5,epochs=1", defense="wbc", rounds=3,
                              attack_rounds=(2,), clients_per_round=8)
    sc = cell.scenario
    result = fedbench.run_cell(cell, on_round=lambda rnd, row: rows.append([]))
    per_round = rows[: cell.rounds]
    assert [r["adversarial"] for r in result.rounds] == [False, True, False]
    # benign rounds: K clients, all with WBC; the adversarial round: only the K - M benign ones
    assert per_round[0] and set(per_round[0]) == {sc.clients_per_round}
    assert per_round[1] and set(per_round[1]) == {sc.clients_per_round - sc.num_malicious}
    assert per_round[2] and set(per_round[2]) == {sc.clients_per_round}


def test_malicious_updates_are_the_same_with_and_without_wbc(monkeypatch):
    """With lam < 1 a malicious client takes several steps per epoch on its own data, where WBC would
    perturb; its updates must not depend on the benign clients' defense."""
    seen: dict[str, torch.Tensor] = {}
    original = Poison.malicious_updates
    label = {"now": ""}

    def recording(self, rnd):
        out = original(self, rnd)
        seen[label["now"]] = out.clone()
        return out

    monkeypatch.setattr(Poison, "malicious_updates", recording)
    for defense in ("fedavg", "wbc:s=1.0"):
        label["now"] = defense
        cell = fedbench.make_cell(dataset="digits", attack="poison:lam=0.5,epochs=1", defense=defense, rounds=1,
                                  attack_rounds=(1,))
        fedbench.run_cell(cell)
    assert torch.equal(seen["fedavg"], seen["wbc:s=1.0"])
