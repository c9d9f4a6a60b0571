"""The GRU's hand-written training step (`models.gru_loop`) against torch autograd on the same loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.features import Featurizer, RawEvent
from models.gru import GRU4Rec
from models.gru_loop import bpr_max
from models.kernels import below

torch.set_num_threads(1)


def torch_bpr_max(s: torch.Tensor, cand: torch.Tensor, bpreg: float) -> torch.Tensor:
    """BPR-max of logits s [C] whose candidate 0 is the target; its copies are no negatives."""
    neg = cand != cand[0]
    neg[0] = False
    p = torch.softmax(s.masked_fill(~neg, float("-inf")), 0)
    return -torch.log((p * torch.sigmoid(s[0] - s)).sum() + 1e-24) + bpreg * (p * s.masked_fill(~neg, 0.0) ** 2).sum()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bpr_max_gradient_matches_autograd(seed):
    rng = np.random.default_rng(seed)
    cand = np.array([3, 5, 3, 7, 5, 1, 3, 9], np.int64)  # the target again at 2 and 6, item 5 twice
    s = rng.normal(0, 2, len(cand)).astype(np.float32)
    g = np.zeros_like(s)
    loss = bpr_max(s, cand, np.float32(0.5), g)
    st = torch.tensor(s, requires_grad=True)
    want = torch_bpr_max(st, torch.from_numpy(cand), 0.5)
    want.backward()
    assert loss == pytest.approx(want.item(), rel=1e-5)
    np.testing.assert_allclose(g, st.grad.numpy(), rtol=1e-4, atol=1e-6)
    assert g[2] == 0 and g[6] == 0  # copies of the target are no candidates
    assert np.isnan(bpr_max(s[:3], np.array([3, 3, 3]), np.float32(0.5), g[:3]))  # no negative at all


def test_one_event_step_matches_autograd():
    """One event of a session with a full window: the updated GRU weights, item rows, accumulators and
    hidden state equal a torch reference (GRUCell through the window, BPR-max, Adagrad)."""
    H, E, bptt, M, N = 6, 5, 3, 4, 9
    model = GRU4Rec(hidden=H, embedding=E, negatives=N, bptt=bptt, mean_items=M, lr=0.05, emb_lr=0.1, bpreg=0.7, seed=4)
    feat = Featurizer()
    rng = np.random.default_rng(0)
    warm = [RawEvent(f"u{k % 3}", f"i{rng.integers(15)}", "click", float(k), f"s{k % 3}") for k in range(60)]
    for k in range(0, len(warm), 7):
        model.learn(feat.batch(warm[k : k + 7]))
    model.drain_changes()
    b = feat.batch([RawEvent("u1", "i4", "purchase", 100.0, "s1")])  # weight 3
    before = {k: np.array(v, copy=True) for k, v in model.export_state().items()}
    s, i, w = int(b.sessions[0]), int(b.items[0]), float(b.weights[0])
    row = before["session"][s]
    L = model._keep
    win = row[1 : 1 + L].astype(np.int64) - 1
    h_back = torch.tensor(row[1 + L + H :], dtype=torch.float32)
    h_old = torch.tensor(row[1 + L : 1 + L + H], dtype=torch.float32)
    assert (win >= 0).sum() >= max(bptt, M)  # the window and the mean are full
    n = b.n_items
    counter = int(model._rng[0])
    cand = np.array([i] + [below(np.uint64(counter + c), n) for c in range(1, N + 1)], np.int64)

    flat = torch.tensor(before["weights"][0], requires_grad=True)
    a, c = 3 * H * E, 3 * H * (E + H)
    w_ih, w_hh = flat[:a].view(3 * H, E), flat[a:c].view(3 * H, H)
    b_ih, b_hh = flat[c : c + 3 * H], flat[c + 3 * H :]
    emb = torch.tensor(before["item_emb"], requires_grad=True)
    out = torch.tensor(before["item_out"], requires_grad=True)
    bias = torch.tensor(before["item_bias"], requires_grad=True)
    h = h_back
    for it in win[-bptt:]:
        h = torch._VF.gru_cell(emb[it][None], h[None], w_ih, w_hh, b_ih, b_hh)[0]
    m = emb[torch.from_numpy(win[-M:])].mean(0)
    ct = torch.from_numpy(cand)
    logits = out[ct] @ h + emb[ct] @ m + bias[ct, 0]
    loss = w * torch_bpr_max(logits, ct, 0.7)
    loss.backward()

    def adagrad(x: np.ndarray, acc: np.ndarray, g: np.ndarray, lr: float) -> tuple[np.ndarray, np.ndarray]:
        acc = acc + g * g
        return x - lr * g / (np.sqrt(acc) + 1e-10), acc

    w_new, w_acc = adagrad(before["weights"][0], before["weights"][1], flat.grad.numpy(), 0.05)
    acc = before["item_acc"].copy()
    emb_new, acc[:, :E] = adagrad(before["item_emb"], acc[:, :E], emb.grad.numpy(), 0.1)
    out_new, acc[:, E : E + H] = adagrad(before["item_out"], acc[:, E : E + H], out.grad.numpy(), 0.05)
    bias_new, acc[:, E + H :] = adagrad(before["item_bias"], acc[:, E + H :], bias.grad.numpy(), 0.05)

    model.learn(b)
    after = model.export_state()
    tol = {"rtol": 2e-4, "atol": 2e-5}
    np.testing.assert_allclose(after["weights"][0], w_new, **tol)
    np.testing.assert_allclose(after["weights"][1], w_acc, **tol)
    np.testing.assert_allclose(after["item_emb"], emb_new, **tol)
    np.testing.assert_allclose(after["item_out"], out_new, **tol)
    np.testing.assert_allclose(after["item_bias"], bias_new, **tol)
    np.testing.assert_allclose(after["item_acc"], acc, **tol)
    assert np.abs(after["weights"][0] - before["weights"][0]).max() > 1e-3  # the step did move the weights
    touched = set(cand.tolist()) | set(win[-M:].tolist())
    assert set(model.drain_changes()["item_emb"].tolist()) == touched
    # the session then steps through the item with the updated weights
    new = torch.tensor(w_new)
    with torch.no_grad():
        h_want = torch._VF.gru_cell(torch.tensor(emb_new[i])[None], h_old[None], new[:a].view(3 * H, E),
                                    new[a:c].view(3 * H, H), new[c : c + 3 * H], new[c + 3 * H :])[0]
    np.testing.assert_allclose(model.hidden_state(s), h_want.numpy(), **tol)
    assert after["item_count"][i, 0] == before["item_count"][i, 0] + w
