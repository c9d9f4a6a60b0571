"""The compiled kernels of `models.caser.Caser`: encode a window of items, and learn events one by one.

Shapes: L window length, d embedding size, n_v vertical and n_h horizontal filters per height.
`dense` = (Wv [n_v, L], bv [n_v], Wh [L, n_h, L, d], bh [L, n_h], W1 [d, n_o], b1 [d]) with
n_o = n_v d + L n_h; Wh[h - 1] holds the filters of height h in its first h rows (the rest stay 0).
A window row holds item ids + 1, newest last, 0 for no item (whose embedding is zero).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from models.kernels import below

# Change bits per item row (a bit per item table), for drain_changes.
IN = np.uint8(1)  # input embedding
OUT = np.uint8(2)  # output vector and bias
ACC = np.uint8(4)  # step accumulators
COUNT = np.uint8(8)
ALL = IN | OUT | ACC | COUNT
FAST = {"reassoc", "contract", "nsz", "arcp", "afn"}


@njit(cache=True, fastmath=FAST)
def encode(win, u, E, P, dense, leak, emat, o, hpos, x):  # pragma: no cover - numba
    """x [2d] = [z, P[u]] for the window `win` [L] of user row u (-1: none, a zero user vector), with
    z = relu(W1 [vertical conv outputs, max over time of relu(horizontal convs)] + b1). Keeps what the
    backward pass needs: the window's embeddings emat [L, d], the layer input o [n_o], and where each
    horizontal filter peaked, hpos [L n_h] (-1: never above 0)."""
    Wv, bv, Wh, bh, W1, b1 = dense
    L, d = emat.shape
    n_v, n_h = Wv.shape[0], Wh.shape[1]
    n_items = E.shape[0]
    for p in range(L):
        it = np.int64(win[p]) - 1
        if 0 <= it < n_items:
            for k in range(d):
                emat[p, k] = E[it, k]
        else:
            for k in range(d):
                emat[p, k] = 0.0
    for f in range(n_v):
        for k in range(d):
            o[f * d + k] = bv[f]
        for p in range(L):
            wf = Wv[f, p]
            for k in range(d):
                o[f * d + k] += wf * emat[p, k]
    off = n_v * d
    for h in range(1, L + 1):
        for f in range(n_h):
            best = np.float32(0.0)
            at = -1
            for t in range(L - h + 1):
                c = bh[h - 1, f]
                for a in range(h):
                    for k in range(d):
                        c += Wh[h - 1, f, a, k] * emat[t + a, k]
                if c > best:
                    best = c
                    at = t
            o[off + (h - 1) * n_h + f] = best
            hpos[(h - 1) * n_h + f] = at
    for k in range(d):
        acc = b1[k]
        for m in range(o.shape[0]):
            acc += W1[k, m] * o[m]
        x[k] = acc if acc > 0.0 else leak * acc
    for k in range(d):
        x[d + k] = P[u, k] if 0 <= u < P.shape[0] else np.float32(0.0)


def scratch(L: int, d: int, n_o: int, n_h: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """encode's work arrays (emat, o, hpos)."""
    return np.empty((L, d), np.float32), np.empty(n_o, np.float32), np.empty(L * n_h, np.int64)


@njit(cache=True, fastmath=FAST)
def encode_rows(wins, users, E, P, dense, leak, emat, o, hpos, X):  # pragma: no cover - numba
    """X[r] = encode(wins[r], users[r]) for each row r."""
    for r in range(len(users)):
        encode(wins[r], users[r], E, P, dense, leak, emat, o, hpos, X[r])


@njit(cache=True, fastmath=FAST)
def score_rows(X, V, b, out):  # pragma: no cover - numba
    """out [R, n] = X [R, 2d] . V[:n] + b[:n]: each score summed in one order whatever n is, so a grown
    vocabulary leaves the scores of earlier items as they were, to the last bit. Items outside, queries
    inside: each item row is read once for all R queries (the loop is bound by reading the rows)."""
    for j in range(out.shape[1]):
        for r in range(X.shape[0]):
            acc = b[j, 0]
            for k in range(X.shape[1]):
                acc += X[r, k] * V[j, k]
            out[r, j] = acc


@njit(cache=True, fastmath=FAST, inline="always")
def _rate(acc, r, col, g2, lr, eps):  # pragma: no cover - numba
    """Row-wise Adagrad: add a row's mean squared gradient g2 to its accumulator acc[r, col]; its step size."""
    a = acc[r, col] + g2
    acc[r, col] = a
    return lr / (np.sqrt(a) + eps)


@njit(cache=True, fastmath=FAST)
def learn_events(users, items, sessions, weights, tables, dirty, dense, dense_acc, rng, hyper):  # pragma: no cover
    """Learn the events in order: for each, the user's window predicts the event's item against
    `n_negatives` draws among the items seen (each item a candidate once; sampled softmax, scaled by the event weight),
    and every row that took part steps at once (row-wise Adagrad: an item's or user's vector, a
    filter with its bias, a row of W1 with its bias); then the item joins the user's and session's windows.

    tables = (E, W2, b2, item_acc [n_items, 3]: accumulators of E, W2 and b2, count, P, user_acc,
    user_win, sess_win); dirty = (item, user, session) change flags; dense_acc = the accumulators of
    the rows of Wv [n_v, 1], Wh [L n_h, 1] and W1 [d, 1]; rng [1] the draw counter; hyper = (n_negatives, lr,
    emb_lr, eps).
    """
    E, W2, b2, item_acc, count, P, user_acc, user_win, sess_win = tables
    item_dirty, user_dirty, sess_dirty = dirty
    Wv, bv, Wh, bh, W1, b1 = dense
    acc_v, acc_h, acc_1 = dense_acc
    n_neg, lr, emb_lr, eps, leak = hyper
    leak = np.float32(leak)
    lr, emb_lr, eps = np.float32(lr), np.float32(emb_lr), np.float32(eps)
    L, d = Wh.shape[2], Wh.shape[3]
    n_v, n_h, n_o = Wv.shape[0], Wh.shape[1], W1.shape[1]
    n_items = E.shape[0]
    emat, o, hpos = np.empty((L, d), np.float32), np.empty(n_o, np.float32), np.empty(L * n_h, np.int64)
    x = np.empty(2 * d, np.float32)
    dx = np.empty(2 * d, np.float32)
    do = np.empty(n_o, np.float32)
    demat = np.empty((L, d), np.float32)
    gw = np.empty(L, np.float32)
    cand = np.empty(n_neg + 1, np.int64)
    s = np.empty(n_neg + 1, np.float32)
    one = np.float32(1.0)
    picked = np.full(n_items, -1, np.int64)  # the event that last made each item a candidate
    draw = rng[0]
    for e in range(len(items)):
        u, i, sess, w = users[e], items[e], sessions[e], np.float32(weights[e])
        count[i, 0] += w
        item_dirty[i] |= COUNT
        win = user_win[u]
        encode(win, u, E, P, dense, leak, emat, o, hpos, x)
        # candidates: the item, then the negatives
        cand[0] = i
        nc = 1
        picked[i] = e
        for _ in range(n_neg):
            draw += np.uint64(1)
            j = below(draw, n_items)
            if picked[j] != e and count[j, 0] > 0.0:  # each item once: few items make a full softmax
                picked[j] = e
                cand[nc] = j
                nc += 1
        top = np.float32(-np.inf)
        for c in range(nc):
            j = cand[c]
            sc = b2[j, 0]
            for k in range(2 * d):
                sc += W2[j, k] * x[k]
            s[c] = sc
            top = max(top, sc)
        total = np.float32(0.0)
        for c in range(nc):
            s[c] = np.exp(s[c] - top)
            total += s[c]
        xx = np.float32(0.0)
        for k in range(2 * d):
            xx += x[k] * x[k]
            dx[k] = 0.0
        # softmax cross-entropy: d loss / d s_c = w (p_c - [c is the item])
        for c in range(nc):
            j = cand[c]
            g = w * (s[c] / total - (one if c == 0 else np.float32(0.0)))
            rate = _rate(item_acc, j, 1, g * g * xx / (2 * d), lr, eps)
            for k in range(2 * d):
                wk = W2[j, k]
                dx[k] += g * wk
                W2[j, k] = wk - rate * g * x[k]
            b2[j, 0] -= _rate(item_acc, j, 2, g * g, lr, eps) * g
            item_dirty[j] |= OUT | ACC
        if 0 <= u < P.shape[0]:
            gg = np.float32(0.0)
            for k in range(d):
                gg += dx[d + k] * dx[d + k]
            rate = _rate(user_acc, u, 0, gg / d, emb_lr, eps)
            for k in range(d):
                P[u, k] -= rate * dx[d + k]
        # back through the layers, each row stepping once its gradient has been passed on
        for m in range(n_o):
            do[m] = 0.0
        oo = np.float32(1.0)
        for m in range(n_o):
            oo += o[m] * o[m]
        for k in range(d):
            g = dx[k] if x[k] > 0.0 else leak * dx[k]
            if g == 0.0:
                continue
            rate = _rate(acc_1, k, 0, g * g * oo / (n_o + 1), lr, eps)
            for m in range(n_o):
                wk = W1[k, m]
                do[m] += wk * g
                W1[k, m] = wk - rate * g * o[m]
            b1[k] -= rate * g
        for p in range(L):
            for k in range(d):
                demat[p, k] = 0.0
        for f in range(n_v):
            gb = np.float32(0.0)
            for k in range(d):
                gb += do[f * d + k]
            gg = gb * gb
            for p in range(L):
                a = np.float32(0.0)
                wf = Wv[f, p]
                for k in range(d):
                    a += do[f * d + k] * emat[p, k]
                    demat[p, k] += wf * do[f * d + k]
                gw[p] = a
                gg += a * a
            rate = _rate(acc_v, f, 0, gg / (L + 1), lr, eps)
            for p in range(L):
                Wv[f, p] -= rate * gw[p]
            bv[f] -= rate * gb
        off = n_v * d
        for h in range(1, L + 1):
            for f in range(n_h):
                t = hpos[(h - 1) * n_h + f]
                if t < 0:  # never above 0: relu passes no gradient
                    continue
                g = do[off + (h - 1) * n_h + f]
                ee = np.float32(1.0)
                for a in range(h):
                    for k in range(d):
                        ee += emat[t + a, k] * emat[t + a, k]
                rate = _rate(acc_h, (h - 1) * n_h + f, 0, g * g * ee / (h * d + 1), lr, eps)
                for a in range(h):
                    for k in range(d):
                        wk = Wh[h - 1, f, a, k]
                        demat[t + a, k] += g * wk
                        Wh[h - 1, f, a, k] = wk - rate * g * emat[t + a, k]
                bh[h - 1, f] -= rate * g
        for p in range(L):
            it = np.int64(win[p]) - 1
            if 0 <= it < n_items:
                gg = np.float32(0.0)
                for k in range(d):
                    gg += demat[p, k] * demat[p, k]
                rate = _rate(item_acc, it, 0, gg / d, emb_lr, eps)
                for k in range(d):
                    E[it, k] -= rate * demat[p, k]
                item_dirty[it] |= IN | ACC
        # the item joins the windows
        for p in range(L - 1):
            win[p] = win[p + 1]
        win[L - 1] = i + 1
        user_dirty[u] = 1
        if sess >= 0:
            sw = sess_win[sess]
            for p in range(L - 1):
                sw[p] = sw[p + 1]
            sw[L - 1] = i + 1
            sess_dirty[sess] = 1
    rng[0] = draw
