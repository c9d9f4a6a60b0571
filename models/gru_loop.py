"""The compiled training loop of `models.gru.GRU4Rec`: events one by one in stream order, each a step of
its own (forward and backward by hand), so every event learns from the weights the one before left.

Shapes: H hidden, E embedding, L items kept per session, k = bptt, N negatives, n items. The GRU's
weights are one flat array whose `dense_views` are (w_ih [3H, E], w_hh [3H, H], b_ih [3H], b_hh [3H])
in torch's GRUCell layout (gates r, z, n); their elementwise Adagrad accumulators are alike.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from models.gru_sessions import advance, gru_step, input_gates
from models.kernels import FAST, below

_EPS = np.float32(1e-10)  # Adagrad's
_TINY = np.float32(1e-24)  # keeps the log of BPR-max finite


@njit(cache=True, fastmath=FAST, error_model="numpy")
def score_rows(hq, mq, out, emb, bias, res):  # pragma: no cover - numba
    """res [R, n] = hq [R, H] . out[:n] + mq [R, E] . emb[:n] + bias[:n]: each score summed in one order
    whatever n is, so a grown vocabulary leaves the scores of earlier items as they were, to the last bit.
    Items outside, queries inside: each item's rows are read once for all R queries (the loop is bound by
    reading the rows)."""
    for j in range(res.shape[1]):
        for r in range(res.shape[0]):
            acc = bias[j, 0]
            for k in range(hq.shape[1]):
                acc += hq[r, k] * out[j, k]
            for k in range(mq.shape[1]):
                acc += mq[r, k] * emb[j, k]
            res[r, j] = acc


@njit(cache=True, fastmath=FAST, error_model="numpy")
def session_mean(win, emb, mean_items, m):  # pragma: no cover - numba
    """m [E] = mean embedding of the last `mean_items` items of the window win [L] (-1 pads; zeros when
    none); returns how many there were."""
    L = win.shape[0]
    count = 0
    m[:] = 0.0
    for p in range(L - mean_items, L):
        if win[p] >= 0:
            count += 1
            for k in range(m.shape[0]):
                m[k] += emb[win[p], k]
    if count:
        m /= np.float32(count)
    return count


@njit(cache=True, fastmath=FAST, error_model="numpy")
def bpr_max(s, cand, bpreg, g):  # pragma: no cover - numba
    """The BPR-max loss of the logits s [C] (candidate 0 the target; candidates naming the target
    again are no negatives), and its gradient g [C]; nan (g untouched) when there is no negative.

        loss = -log(sum_j p_j sigmoid(s_0 - s_j)) + bpreg sum_j p_j s_j^2,  p = softmax of the negatives' s
    """
    tgt = cand[0]
    top = -np.inf
    for c in range(1, len(cand)):
        if cand[c] != tgt and s[c] > top:
            top = s[c]
    if top == -np.inf:
        return np.nan
    z = np.float32(0.0)
    for c in range(len(cand)):
        g[c] = np.exp(s[c] - top) if c > 0 and cand[c] != tgt else np.float32(0.0)  # p_j unnormalised
        z += g[c]
    P, R, dpos = np.float32(0.0), np.float32(0.0), np.float32(0.0)
    for c in range(1, len(cand)):
        p = g[c] / z
        sig = np.float32(1.0) / (np.float32(1.0) + np.exp(s[c] - s[0]))
        g[c] = p
        P += p * sig
        R += p * s[c] * s[c]
        dpos += p * sig * (np.float32(1.0) - sig)
    inv = np.float32(1.0) / (P + _TINY)
    for c in range(1, len(cand)):
        p = g[c]
        sig = np.float32(1.0) / (np.float32(1.0) + np.exp(s[c] - s[0]))
        g[c] = p * (P - sig * sig) * inv + bpreg * p * (s[c] * s[c] + 2 * s[c] - R)
    g[0] = -dpos * inv
    return -np.log(P + _TINY) + bpreg * R


@njit(cache=True, fastmath=FAST, error_model="numpy")
def adagrad(w, acc, g, lr):  # pragma: no cover - numba
    """Elementwise Adagrad on w [d] (an item row, or the flat GRU weights), accumulators acc [d], by g [d]."""
    for m in range(w.shape[0]):
        a = acc[m] + g[m] * g[m]
        acc[m] = a
        w[m] -= lr * g[m] / (np.sqrt(a) + _EPS)


@njit(cache=True)
def dense_views(flat, H, E):  # pragma: no cover - numba
    """(w_ih [3H, E], w_hh [3H, H], b_ih [3H], b_hh [3H]) as views of the flat weights (or gradients)."""
    a, b = 3 * H * E, 3 * H * (E + H)
    return flat[:a].reshape((3 * H, E)), flat[a:b].reshape((3 * H, H)), flat[b : b + 3 * H], flat[b + 3 * H : b + 6 * H]


@njit(cache=True, fastmath=FAST, error_model="numpy")
def _axpy(y, a, x):  # pragma: no cover - numba
    """y += a x."""
    for k in range(y.shape[0]):
        y[k] += a * x[k]


@njit(cache=True, fastmath=FAST, error_model="numpy")
def learn_events(inv, items, weights, sess, tables, flat, flat_acc, dirty, rng, sizes, steps, score_at, res):  # pragma: no cover
    """Learn the events in order. Event e, of session u = inv[e] with item i, when the session has items
    already: from h_back[u] the GRU steps through the last k of them (its window) to h; the logits
    h . out[j] + m . emb[j] + bias[j] (m the mean embedding of its last `mean_items` items) of i and of
    those of N uniform draws that name items seen already (count > 0) go into BPR-max (whatever the
    event's weight); every weight and item row that took part steps at once by Adagrad. Then i counts
    (by the event's weight), and the session advances through it. An event with score_at[e] = r >= 0
    is first scored as `score_rows` would score it then, into res [R, n] row r; an item -1 (a query)
    is only scored.

    sess = (h [U, H], h_back [U, H], win [U, L]), updated in place; tables = (emb [n, E], out [n, H],
    bias [n, 1], acc [n, E + H + 1] Adagrad accumulators of emb, out and bias, count [n]); flat, flat_acc
    the GRU weights (`dense_views`) and their accumulators; dirty [n] change flags of the item rows;
    rng [1] the draw counter; sizes = (N, k, mean_items); steps = (bpreg, lr, emb_lr): lr for the GRU,
    output rows and biases, emb_lr for the embeddings.
    """
    h, h_back, win = sess
    emb, out, bias, acc, count = tables
    n_neg, bptt, mean_items = sizes
    bpreg, lr, emb_lr = np.float32(steps[0]), np.float32(steps[1]), np.float32(steps[2])
    n, E = emb.shape
    H, L = h.shape[1], win.shape[1]
    C = n_neg + 1
    dense = dense_views(flat, H, E)
    w_ih, w_hh, b_ih, b_hh = dense
    g_flat = np.empty_like(flat)
    g_ih, g_hh, gb_ih, gb_hh = dense_views(g_flat, H, E)
    # work space: the window's gate values (r, z, n), recurrent gates (W_hh h + b_hh) and states; gradients
    xg, gh, hs = np.empty((bptt, 3 * H), np.float32), np.empty((bptt, 3 * H), np.float32), np.empty((bptt + 1, H), np.float32)
    m_vec, dh, dprev, dm = np.empty(E, np.float32), np.empty(H, np.float32), np.empty(H, np.float32), np.empty(E, np.float32)
    dgi, dgh, dx = np.empty(3 * H, np.float32), np.empty(3 * H, np.float32), np.empty(E, np.float32)
    cand, s, g = np.empty(C, np.int64), np.empty(C, np.float32), np.empty(C, np.float32)
    rows, g_row = np.empty(C, np.int64), np.empty(C, np.float32)  # distinct candidates, their summed gradient
    e_rows, d_emb = np.empty(L, np.int64), np.empty((L, E), np.float32)  # the window's and mean's rows, their gradients
    slot, e_slot = np.full(n, -1, np.int64), np.full(n, -1, np.int64)  # where a row is, this event (-1: not)
    step_x, step_g, step_h = np.empty(3 * H, np.float32), np.empty(3 * H, np.float32), np.empty(H, np.float32)
    one = np.float32(1.0)
    draw = rng[0]
    for e in range(len(items)):
        u, i, w = inv[e], items[e], np.float32(weights[e])
        if score_at[e] >= 0:
            session_mean(win[u], emb, mean_items, m_vec)
            score_rows(h[u : u + 1], m_vec[None, :], out, emb, bias, res[score_at[e] : score_at[e] + 1])
        if i < 0:
            continue
        if win[u, L - 1] >= 0:
            # forward: the window's last T items, from h_back
            T = 0
            for p in range(L - bptt, L):
                if win[u, p] >= 0:
                    T += 1
            hs[0] = h_back[u]
            for t in range(T):
                input_gates(emb[win[u, L - T + t]], w_ih, b_ih, xg[t])
                gru_step(xg[t], hs[t], w_hh, b_hh, gh[t], hs[t + 1])
            M = session_mean(win[u], emb, mean_items, m_vec)
            # candidates and their logits
            cand[0] = i
            nc = 1
            for _ in range(n_neg):
                draw += np.uint64(1)
                j = below(draw, n)
                if count[j] > 0.0:  # seen already: a draw of an item yet to come would push it down before it shows
                    cand[nc] = j
                    nc += 1
            hT = hs[T]
            for c in range(nc):
                j = cand[c]
                acc_s = bias[j, 0]
                for k in range(H):
                    acc_s += hT[k] * out[j, k]
                for k in range(E):
                    acc_s += m_vec[k] * emb[j, k]
                s[c] = acc_s
            if not np.isnan(bpr_max(s[:nc], cand[:nc], bpreg, g[:nc])):  # nan: no negative
                # each distinct candidate once, its gradient summed over its copies
                nr = 0
                for c in range(nc):
                    j = cand[c]
                    if slot[j] < 0:
                        slot[j] = nr
                        rows[nr] = j
                        g_row[nr] = 0.0
                        nr += 1
                    g_row[slot[j]] += g[c]
                # the window's and the mean's items, each once, with their embeddings' gradients
                ne = 0
                for p in range(L - max(T, mean_items), L):
                    j = win[u, p]
                    if j >= 0 and e_slot[j] < 0:
                        e_slot[j] = ne
                        e_rows[ne] = j
                        d_emb[ne] = 0.0
                        ne += 1
                dh[:] = 0.0
                dm[:] = 0.0
                for r in range(nr):
                    j, gr = rows[r], g_row[r]
                    _axpy(dh, gr, out[j])
                    _axpy(dm, gr, emb[j])
                    if e_slot[j] >= 0:  # a candidate of the window: its rank-1 gradient gr m joins the rest
                        _axpy(d_emb[e_slot[j]], gr, m_vec)
                if M:
                    dm /= np.float32(M)
                    for p in range(L - mean_items, L):
                        if win[u, p] >= 0:
                            _axpy(d_emb[e_slot[win[u, p]]], one, dm)
                # backward through the window
                g_flat[:] = 0.0
                for t in range(T - 1, -1, -1):
                    hp = hs[t]
                    for k in range(H):
                        r_, z_, n_ = xg[t, k], xg[t, H + k], xg[t, 2 * H + k]  # the gates' values
                        d = dh[k]
                        dan = d * (one - z_) * (one - n_ * n_)
                        dar = dan * gh[t, 2 * H + k] * r_ * (one - r_)
                        daz = d * (hp[k] - n_) * z_ * (one - z_)
                        dgi[k], dgi[H + k], dgi[2 * H + k] = dar, daz, dan
                        dgh[k], dgh[H + k], dgh[2 * H + k] = dar, daz, dan * r_
                        dprev[k] = d * z_
                    x = emb[win[u, L - T + t]]
                    dx[:] = 0.0
                    for q in range(3 * H):
                        a_i, a_h = dgi[q], dgh[q]
                        gb_ih[q] += a_i
                        gb_hh[q] += a_h
                        for k in range(E):
                            g_ih[q, k] += a_i * x[k]
                            dx[k] += w_ih[q, k] * a_i
                        for k in range(H):
                            g_hh[q, k] += a_h * hp[k]
                            dprev[k] += w_hh[q, k] * a_h
                    _axpy(d_emb[e_slot[win[u, L - T + t]]], one, dx)
                    dh[:] = dprev
                # every step at once
                adagrad(flat, flat_acc, g_flat, lr)
                for r in range(nr):  # a candidate's rows in one pass: gradients gr h (out), gr (bias), gr m (emb)
                    j, gr = rows[r], g_row[r]
                    for k in range(H):
                        gk = gr * hT[k]
                        a = acc[j, E + k] + gk * gk
                        acc[j, E + k] = a
                        out[j, k] -= lr * gk / (np.sqrt(a) + _EPS)
                    a = acc[j, E + H] + gr * gr
                    acc[j, E + H] = a
                    bias[j, 0] -= lr * gr / (np.sqrt(a) + _EPS)
                    if M and e_slot[j] < 0:
                        for k in range(E):
                            gk = gr * m_vec[k]
                            a = acc[j, k] + gk * gk
                            acc[j, k] = a
                            emb[j, k] -= emb_lr * gk / (np.sqrt(a) + _EPS)
                    slot[j] = -1
                    dirty[j] = 1
                for r in range(ne):
                    j = e_rows[r]
                    adagrad(emb[j], acc[j, :E], d_emb[r], emb_lr)
                    e_slot[j] = -1
                    dirty[j] = 1
        count[i] += w
        dirty[i] = 1
        advance(u, i, h, h_back, win, bptt, emb, dense, step_x, step_g, step_h)
    rng[0] = draw
