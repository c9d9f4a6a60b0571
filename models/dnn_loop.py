"""The compiled loops of `models.dnn.DNN`: the two towers, and learning a batch event by event.

Arrays come in tuples. rows = (U, user_state, user_recent, user_seen, V, V_in, item_bias, item_state, C,
ctx_state): the model's row tables (see `DNN.tables`); dense = (W1, b1, W2, b2): the user tower's MLP,
and acc = (A1 [h], a1 [h], A2 [d], a2 [d]) their Adagrad accumulators (one per row of W1 and W2);
dirty = (user, item, context) change flags [n]; ring = (recent positives, cursor [1], rng counter [1],
total count [1]). Scalars: sampling = (n_negatives, seen_bits, popular_share); steps = (lr, dense_lr,
bias_lr, l2, decay, eps, recency), float32.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from models.kernels import FAST, below, is_seen, mark_seen, uniform


@njit(cache=True, fastmath=FAST, inline="always")
def _tower(u, context, e, rows, dense, recency, x, pre, a, q):
    """The user tower of user u (-1: unknown) with context row `context[e]`:
    x = [U[u], mean C[c], mean V_in[recent] weighted recency ** age] [3d]; pre = W1 x + b1 [h];
    a = relu(pre) [h]; q = x[:d] + x[d:2d] + x[2d:] + W2 a + b2 [d].
    Returns (context values used, sum of the recent items' weights)."""
    U, user_state, user_recent, _, _, V_in, _, _, C, ctx_state = rows
    W1, b1, W2, b2 = dense
    d, h, L = U.shape[1], W1.shape[0], user_recent.shape[1]
    x[:] = 0.0
    known = 0 <= u < U.shape[0] and user_state[u, 0] >= 1.0
    n_ctx = 0
    w_sum = np.float32(0.0)
    if known:
        for k in range(d):
            x[k] = U[u, k]
        w = np.float32(1.0)
        for t in range(L - 1, -1, -1):  # newest first
            r = np.int64(user_recent[u, t]) - 1  # stored as item + 1, 0 empty
            if 0 <= r < V_in.shape[0]:
                w_sum += w
                for k in range(d):
                    x[2 * d + k] += w * V_in[r, k]
            w *= recency
    for t in range(context.shape[1]):
        c = context[e, t]
        if 0 <= c < C.shape[0] and ctx_state[c, 0] >= 1.0:
            n_ctx += 1
            for k in range(d):
                x[d + k] += C[c, k]
    if n_ctx > 1:
        for k in range(d):
            x[d + k] /= n_ctx
    if w_sum > 0.0:
        for k in range(d):
            x[2 * d + k] /= w_sum
    for j in range(h):
        s = b1[j]
        for k in range(3 * d):
            s += W1[j, k] * x[k]
        pre[j] = s
        a[j] = max(s, np.float32(0.0))
    for k in range(d):
        s = b2[k] + x[k] + x[d + k] + x[2 * d + k]
        for j in range(h):
            s += W2[k, j] * a[j]
        q[k] = s
    return n_ctx, w_sum


@njit(cache=True, fastmath=FAST)
def query(users, context, rows, dense, recency, out, known):
    """out [R, d]: the query vector of each row (user, context row); known [R]: whether the user has a row."""
    d, h = rows[0].shape[1], dense[0].shape[0]
    x = np.empty(3 * d, np.float32)
    pre = np.empty(h, np.float32)
    a = np.empty(h, np.float32)
    for r in range(len(users)):
        _tower(users[r], context, r, rows, dense, recency, x, pre, a, out[r])
        u = users[r]
        known[r] = 0 <= u < rows[0].shape[0] and rows[1][u, 0] >= 1.0


@njit(cache=True, fastmath=FAST, inline="always")
def _adagrad_row(M, r, g, scale, l2, state, col, lr, decay, eps):
    """M[r] -= rate * (scale * g + l2 * M[r]), rate = lr / sqrt(eps + acc) with the row's accumulator
    state[r, col] = decay * acc + mean square of the gradient (row-wise Adagrad, decayed)."""
    d = M.shape[1]
    g2 = np.float32(0.0)
    for k in range(d):
        gk = scale * g[k] + l2 * M[r, k]
        g2 += gk * gk
    acc = decay * state[r, col] + g2 / d
    state[r, col] = acc
    rate = lr / np.sqrt(eps + acc)
    for k in range(d):
        M[r, k] -= rate * (scale * g[k] + l2 * M[r, k])


@njit(cache=True, fastmath=FAST, inline="always")
def _draw(u, i, rows, recent, n_ring, draw, seen_bits, popular_share):
    """A negative for user u's event on item i: from the ring of recent positives with probability
    popular_share, else uniform over the item rows; an item learned already, not i, not in u's seen
    filter (after 8 tries, any learned item but i). Returns (item or -1, draw counter)."""
    user_seen, V, item_state = rows[3], rows[4], rows[7]
    n_items, one = V.shape[0], np.uint64(1)
    j = -1
    tries = 0
    while j < 0 and tries < 16:
        tries += 1
        draw += one
        popular = n_ring > 0 and uniform(draw) < popular_share
        draw += one
        c = recent[below(draw, n_ring)] if popular else below(draw, n_items)
        ok = 0 <= c < n_items and c != i and item_state[c, 0] > 0.0
        if ok and seen_bits > 0 and tries <= 8:
            ok = not is_seen(user_seen, u, c, seen_bits)
        j = c if ok else -1
    return j, draw


@njit(cache=True, fastmath=FAST)
def learn_events(batch, rows, dense, acc, dirty, ring, sampling, steps):
    """Learn the events in order: each event's item against sampled negatives under a sampled softmax
    with logQ correction (Q: the sampling probability of each candidate), then one step of every row
    and weight that took part."""
    users, items, weights, context = batch
    U, user_state, user_recent, user_seen, V, V_in, item_bias, item_state, C, ctx_state = rows
    W1, b1, W2, b2 = dense
    A1, a1, A2, a2 = acc
    user_dirty, item_dirty, ctx_dirty = dirty
    recent, cursor, rng, total = ring
    n_negatives, seen_bits, popular_share = sampling
    lr, dense_lr, bias_lr, l2, decay, eps, recency = steps
    d, h, L, n_recent = U.shape[1], W1.shape[0], user_recent.shape[1], len(recent)
    x = np.empty(3 * d, np.float32)
    pre = np.empty(h, np.float32)
    act = np.empty(h, np.float32)
    q = np.empty(d, np.float32)
    g_q = np.empty(d, np.float32)
    g_a = np.empty(h, np.float32)
    g_x = np.empty(3 * d, np.float32)
    cand = np.empty(n_negatives + 1, np.int64)
    logit = np.empty(n_negatives + 1, np.float32)
    draw, pos = rng[0], cursor[0]
    for e in range(len(items)):
        u, i, w = users[e], items[e], weights[e]
        user_state[u, 0] += 1.0
        item_state[i, 0] += 1.0
        total[0] += 1.0
        user_dirty[u] = 1
        item_dirty[i] = 1
        for t in range(context.shape[1]):
            c = context[e, t]
            if c >= 0:
                ctx_state[c, 0] += 1.0
                ctx_dirty[c] = 1
        n_ctx, w_sum = _tower(u, context, e, rows, dense, recency, x, pre, act, q)
        # candidates: the event's item, then the negatives; logits corrected by log Q
        n_ring = min(pos, n_recent)
        uniform_q = (1.0 - (popular_share if n_ring > 0 else 0.0)) / V.shape[0]
        n_cand = 0
        for t in range(n_negatives + 1):
            j = i
            if t > 0:
                j, draw = _draw(u, i, rows, recent, n_ring, draw, seen_bits, popular_share)
            if j >= 0:
                s = item_bias[j, 0]
                for k in range(d):
                    s += q[k] * V[j, k]
                share = item_state[j, 0] / total[0] if n_ring > 0 else 0.0
                cand[n_cand] = j
                logit[n_cand] = s - np.log(uniform_q + popular_share * share)
                n_cand += 1
        if n_cand > 1:
            top = logit[:n_cand].max()
            z = np.float32(0.0)
            for t in range(n_cand):
                logit[t] = np.exp(logit[t] - top)
                z += logit[t]
            # g_t = w * (p_t - [t is the event's item]) = dloss/ds_t; g_q = sum_t g_t V[cand_t]
            g_q[:] = 0.0
            for t in range(n_cand):
                j = cand[t]
                g = w * (logit[t] / z - (1.0 if t == 0 else 0.0))
                logit[t] = g
                for k in range(d):
                    g_q[k] += g * V[j, k]
            for t in range(n_cand):  # item tower rows: dloss/dV[j] = g_t q
                j = cand[t]
                _adagrad_row(V, j, q, logit[t], l2, item_state, 1, lr, decay, eps)
                item_bias[j, 0] -= bias_lr * logit[t]
                item_dirty[j] = 1
            # back through the user tower: q = x_u + x_c + x_r + W2 relu(W1 x + b1) + b2
            for j in range(h):
                s = np.float32(0.0)
                for k in range(d):
                    s += W2[k, j] * g_q[k]
                g_a[j] = s if pre[j] > 0.0 else np.float32(0.0)
            for k in range(3 * d):
                g_x[k] = g_q[k % d]
            for j in range(h):
                if g_a[j] != 0.0:
                    for k in range(3 * d):
                        g_x[k] += W1[j, k] * g_a[j]
            # W2 -= rate_k * g_q[k] act^T, W1 -= rate_j * g_a[j] x^T: row-wise Adagrad, a row's mean
            # square gradient being g_q[k]^2 mean(act^2) (g_a[j]^2 mean(x^2)); biases elementwise
            act2 = np.float32(0.0)
            for j in range(h):
                act2 += act[j] * act[j]
            act2 /= h
            x2 = np.float32(0.0)
            for k in range(3 * d):
                x2 += x[k] * x[k]
            x2 /= 3 * d
            for k in range(d):
                gb = g_q[k]
                a2[k] = decay * a2[k] + gb * gb
                b2[k] -= dense_lr * gb / np.sqrt(eps + a2[k])
                A2[k] = decay * A2[k] + gb * gb * act2
                rate = dense_lr * gb / np.sqrt(eps + A2[k])
                for j in range(h):
                    W2[k, j] -= rate * act[j]
            for j in range(h):
                gb = g_a[j]
                if gb != 0.0:
                    a1[j] = decay * a1[j] + gb * gb
                    b1[j] -= dense_lr * gb / np.sqrt(eps + a1[j])
                    A1[j] = decay * A1[j] + gb * gb * x2
                    rate = dense_lr * gb / np.sqrt(eps + A1[j])
                    for k in range(3 * d):
                        W1[j, k] -= rate * x[k]
            # the user's own rows: its vector, the context values and recent items averaged into x
            _adagrad_row(U, u, g_x[:d], np.float32(1.0), l2, user_state, 1, lr, decay, eps)
            for t in range(context.shape[1]):
                c = context[e, t]
                if c >= 0:
                    _adagrad_row(C, c, g_x[d : 2 * d], np.float32(1.0 / max(n_ctx, 1)), l2, ctx_state, 1, lr, decay, eps)
            share = np.float32(1.0) / max(w_sum, np.float32(1e-30))
            for t in range(L - 1, -1, -1):
                r = np.int64(user_recent[u, t]) - 1
                if 0 <= r < V_in.shape[0]:
                    _adagrad_row(V_in, r, g_x[2 * d :], share, l2, item_state, 2, lr, decay, eps)
                    item_dirty[r] = 1
                share *= recency
        # then the event joins the user's recent items, seen filter and the ring of positives
        for t in range(L - 1):
            user_recent[u, t] = user_recent[u, t + 1]
        user_recent[u, L - 1] = np.float32(i + 1)
        if seen_bits > 0:
            mark_seen(user_seen, u, i, seen_bits)
        recent[pos % n_recent] = i
        pos += 1
        if pos >= 2 * n_recent:
            pos -= n_recent
    rng[0], cursor[0] = draw, pos
