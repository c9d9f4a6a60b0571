"""The compiled loop of `models.mf.MF`: it learns a batch event by event, in named steps.

The steps are inlined (`inline="always"`), so the loop compiles as one function and the RNG counter
and ring cursor stay in registers. Numba counts references to each array a step is given (an atomic
add per array per call) unless the step is plain: it uses every array on every path (branches inside
loops are fine), has no `break` and calls nothing that may raise. So `learn_events` itself calls
`_rate` (a division) and hands the steps the rate. `_rate` stays a function of its own: inlined, the
compiler rounds differently, and the learned parameters would change in the last bit.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from models.kernels import FAST, below, is_seen, mark_seen, uniform

# Change bits per row (a bit per table of a kind), for drain_changes.
STATE = np.uint8(1)  # sightings or accumulator
VECTOR = np.uint8(2)
BIAS = np.uint8(4)
SEEN = np.uint8(8)  # the user's seen filter
ALL = STATE | VECTOR | BIAS | SEEN
@njit(cache=True)
def query(users, context, U, user_state, C, ctx_state, admit, out):
    """out [R, d]: out[r] = U[user] + mean of the admitted C[c]; unknown ids add nothing."""
    out[:] = 0.0
    for r in range(len(users)):
        u = users[r]
        if 0 <= u < U.shape[0] and user_state[u, 0] >= admit:
            out[r] += U[u]
        n = 0
        for c in context[r]:
            if 0 <= c < C.shape[0] and ctx_state[c, 0] >= admit:
                n += 1
        for c in context[r]:
            if 0 <= c < C.shape[0] and ctx_state[c, 0] >= admit:
                out[r] += C[c] / n


@njit(cache=True, fastmath=FAST)
def _rate(state, r, g2, lr, decay, eps):
    """The step size of row r after a gradient with mean square g2 (RMSprop, accumulator state[r, 1])."""
    acc = np.float32(decay) * state[r, 1] + np.float32(1.0 - decay) * max(np.float32(g2), np.float32(0.0))
    state[r, 1] = acc  # g2 may come from a rounded difference, hence the max
    return np.float32(lr) / np.sqrt(np.float32(eps) + acc)


@njit(cache=True, fastmath=FAST, inline="always")
def _step(M, r, a, x, l2, state, lr, decay, eps):
    """M[r] += rate * (a * x - l2 * M[r]); False when that gradient is 0 (nothing changes)."""
    dim = M.shape[1]
    a, l2 = np.float32(a), np.float32(l2)
    g2 = np.float32(0.0)
    for k in range(dim):
        grad = a * x[k] - l2 * M[r, k]
        g2 += grad * grad
    if g2 == 0.0:
        return False
    rate = _rate(state, r, g2 / dim, lr, decay, eps)
    for k in range(dim):
        M[r, k] += rate * (a * x[k] - l2 * M[r, k])
    return True


# Arrays come in tuples: batch = (users, items, weights, context); rows = (U, user_state, user_seen, V,
# item_bias, item_state, C, ctx_state), the model's tables; dirty = (user, item, context) change flags
# [n]; ring = (recent, cursor [1], rng [1]); probe and log, see `learn_events`. Scalars too: sampling =
# (n_negatives, negative_pool, hard, seen_bits, popular_share, admit); steps = (lr, negative_lr, l2,
# bias_lr, decay, eps), float32.


@njit(cache=True, inline="always")
def _score_event(e, r, batch, rows, probe, admit):
    """Score event e as the model stands now, as row r: its query vector to Q[r], whether its user has
    a trained row to trained[r]."""
    users, _, _, context = batch
    U, user_state, _, _, _, _, C, ctx_state = rows
    _, Q, trained = probe
    query(users[e : e + 1], context[e : e + 1], U, user_state, C, ctx_state, admit, Q[r : r + 1])
    trained[r] = user_state[users[e], 0] >= admit


@njit(cache=True, inline="always")
def _count_sightings(e, u, i, context, rows, dirty, admit):
    """One more sighting of the event's user, item and context values; returns how many of its
    context values are admitted."""
    _, user_state, _, _, _, item_state, _, ctx_state = rows
    user_dirty, item_dirty, ctx_dirty = dirty
    user_state[u, 0] += 1.0
    item_state[i, 0] += 1.0
    user_dirty[u] |= STATE
    item_dirty[i] |= STATE
    n_ctx = 0
    for t in range(context.shape[1]):  # read in place: a row view per event would cost a reference count
        c = context[e, t]
        if c >= 0:
            ctx_state[c, 0] += 1.0
            ctx_dirty[c] |= STATE
            if ctx_state[c, 0] >= admit:
                n_ctx += 1
    return n_ctx


@njit(cache=True, fastmath=FAST, inline="always")
def _event_query(e, u, i, context, share, rows, admit, q, g_neg):
    """q = U[u] (zero while the user is not admitted) + share * the admitted C[c]; zeroes g_neg.
    Returns (q . V[i], q . q, V[i] . V[i])."""
    U, _, _, V, _, _, C, ctx_state = rows
    dim = U.shape[1]
    for k in range(dim):
        q[k] = U[u, k]
        g_neg[k] = 0.0
    for t in range(context.shape[1]):
        c = context[e, t]
        if c >= 0 and ctx_state[c, 0] >= admit:
            for k in range(dim):
                q[k] += share * C[c, k]
    qv = np.float32(0.0)
    qq = np.float32(0.0)
    vv_i = np.float32(0.0)
    for k in range(dim):
        qv += q[k] * V[i, k]
        qq += q[k] * q[k]
        vv_i += V[i, k] * V[i, k]
    return qv, qq, vv_i


@njit(cache=True, fastmath=FAST, inline="always")
def _candidate(q, V, item_bias, c):
    """(q . V[c], V[c] . V[c], the score q . V[c] + b[c]) of candidate item c."""
    d = np.float32(0.0)
    cc = np.float32(0.0)
    for k in range(V.shape[1]):
        d += q[k] * V[c, k]
        cc += V[c, k] * V[c, k]
    return d, cc, d + item_bias[c, 0]


@njit(cache=True, fastmath=FAST, inline="always")
def _draw_negative(u, i, q, s_i, rows, recent, draw, pos, sampling):
    """A negative for the event (user u, item i, score s_i): the highest-scoring of up to negative_pool
    valid candidates within 4 * negative_pool draws, fewer once the best is already hard (s_i - s_j <=
    hard). Returns (j, q . V[j], V[j] . V[j], s_j, spare, draw): j -1 when no valid candidate came up,
    spare then one the seen filter rejected (-1: none either)."""
    _, _, user_seen, V, item_bias, item_state, _, _ = rows
    _, negative_pool, hard, seen_bits, popular_share, _ = sampling
    n_items, n_recent, one = V.shape[0], len(recent), np.uint64(1)
    n_draws = n_pool = 0
    j = spare = -1
    dot = vv = np.float32(0.0)
    s_j = np.float32(-np.inf)
    done = False
    while not done and n_draws < 4 * negative_pool:  # not `for` with `break`: see the module docstring
        n_draws += 1
        popular = False
        if popular_share > 0.0 and pos > 0:
            draw += one
            popular = uniform(draw) < popular_share
        draw += one
        c = recent[int(uniform(draw) * min(pos, n_recent))] if popular else below(draw, n_items)
        if c < 0 or c >= n_items or c == i or item_state[c, 0] == 0.0:  # 0: a freed row, or not learned yet
            continue
        if seen_bits > 0 and is_seen(user_seen, u, c, seen_bits):
            spare = c
            continue
        d, cc, s_c = _candidate(q, V, item_bias, c)
        better = s_c > s_j  # selects, not branches: which candidate wins is a coin flip
        j = c if better else j
        dot = d if better else dot
        vv = cc if better else vv
        s_j = s_c if better else s_j
        n_pool += 1
        done = n_pool == negative_pool or s_i - s_j <= hard
    return j, dot, vv, s_j, spare, draw


@njit(cache=True, inline="always")
def _log_item(V, item_bias, j, epoch, log, n_log):
    """Append item j's row as it is now (vector, bias) to the log with `epoch`; returns the new length."""
    log_epoch, log_item, log_row, _ = log
    dim = V.shape[1]
    log_epoch[n_log] = epoch
    log_item[n_log] = j
    for k in range(dim):
        log_row[n_log, k] = V[j, k]
    log_row[n_log, dim] = item_bias[j, 0]
    return n_log + 1


@njit(cache=True, fastmath=FAST, inline="always")
def _step_negative(j, g, rate, q, g_neg, rows, item_dirty, steps):
    """Step negative item j (BPR gradient g) with `rate` as it is scored, adding g * V[j] to g_neg first."""
    _, _, _, V, item_bias, _, _, _ = rows
    l2, bias_lr = steps[2], steps[3]
    for k in range(V.shape[1]):
        v = V[j, k]
        g_neg[k] += g * v
        V[j, k] = v - rate * (g * q[k] + l2 * v)
    item_dirty[j] |= VECTOR | STATE | (BIAS if bias_lr > 0.0 else np.uint8(0))
    item_bias[j, 0] -= bias_lr * g  # bias_lr 0: no change


@njit(cache=True, inline="always")
def _push_recent(recent, pos, i):
    """Put item i in the ring of recent positives at cursor pos; returns the next cursor."""
    n_recent = len(recent)
    recent[pos % n_recent] = i
    pos += 1
    if pos >= 2 * n_recent:  # keep the cursor small (exact as float32); position and fill stay the same
        pos -= n_recent
    return pos


@njit(cache=True, fastmath=FAST, inline="always")
def _own_gradient(u, i, g_sum, g_neg, g_q, rows):
    """g_q = g_sum V[i] - g_neg, the gradient of q summed over the negatives; returns (g_q . g_q,
    g_q . U[u], U[u] . U[u])."""
    U, _, _, V, _, _, _, _ = rows
    gg = np.float32(0.0)
    gu = np.float32(0.0)
    uu = np.float32(0.0)
    for k in range(U.shape[1]):
        gk = g_sum * V[i, k] - g_neg[k]
        g_q[k] = gk
        gg += gk * gk
        gu += gk * U[u, k]
        uu += U[u, k] * U[u, k]
    return gg, gu, uu


@njit(cache=True, fastmath=FAST, inline="always")
def _step_user(u, rate, g_q, l2_sum, U, user_dirty):
    """U[u] += rate * (g_q - l2_sum U[u])."""
    for k in range(U.shape[1]):
        U[u, k] += rate * (g_q[k] - l2_sum * U[u, k])
    user_dirty[u] |= VECTOR


@njit(cache=True, fastmath=FAST, inline="always")
def _step_item(i, rate, g_sum, q, l2_sum, V, item_dirty):
    """V[i] += rate * (g_sum q - l2_sum V[i])."""
    for k in range(V.shape[1]):
        V[i, k] += rate * (g_sum * q[k] - l2_sum * V[i, k])
    item_dirty[i] |= VECTOR


@njit(cache=True, fastmath=FAST)
def learn_events(batch, rows, dirty, ring, probe, log, sampling, steps):
    """Learn the events in order, as `models.mf` describes.

    probe = (score_at [B] or [0], Q [R, d], trained [R]): event e with score_at[e] = r >= 0 is scored
    first (`_score_event`). log = (log_epoch [L], log_item [L], log_row [L, d + 1], n_log [1]): each later
    change to an item row logs the row as it was with epoch r + 1, so `rewind` can score rows 0..r with it.
    """
    users, items, weights, context = batch
    U, user_state, user_seen, V, item_bias, item_state, C, ctx_state = rows
    user_dirty, item_dirty, ctx_dirty = dirty
    recent, cursor, rng = ring
    n_negatives, _, _, seen_bits, _, admit = sampling
    lr, negative_lr, l2, bias_lr, decay, eps = steps
    score_at = probe[0]
    scoring = len(score_at) > 0
    dim = U.shape[1]
    inv_dim = np.float32(1.0 / dim)
    q = np.empty(dim, np.float32)  # the event's user + context vector
    g_neg = np.empty(dim, np.float32)  # sum over negatives of g * V[j]
    g_q = np.empty(dim, np.float32)  # the gradient of q, summed over negatives
    epoch = n_log = 0  # scored rows passed so far; log length
    # The RNG counter and ring cursor stay in registers (stored back at the end): in their arrays, the row
    # stores in between would make every draw wait for a reload.
    draw, pos = rng[0], cursor[0]
    for e in range(len(items)):
        u, i, w = users[e], items[e], weights[e]
        if scoring and score_at[e] >= 0:
            _score_event(e, score_at[e], batch, rows, probe, admit)
            epoch = score_at[e] + 1
        n_ctx = _count_sightings(e, u, i, context, rows, dirty, admit)
        qv, qq, vv_i = _event_query(e, u, i, context, np.float32(1.0 / max(n_ctx, 1)), rows, admit, q, g_neg)
        s_i = qv + item_bias[i, 0]
        g_sum = np.float32(0.0)
        n_used = 0
        for _ in range(n_negatives):
            j, dot, vv, s_j, spare, draw = _draw_negative(u, i, q, s_i, rows, recent, draw, pos, sampling)
            if j < 0:  # only seen items came up: take one, so a user who has seen every item still learns
                if spare < 0:
                    continue
                j = spare
                dot, vv, s_j = _candidate(q, V, item_bias, j)
            n_used += 1
            g = w / (np.float32(1.0) + np.exp(min(s_i - s_j, np.float32(50.0))))  # -d/ds_i of -log sigmoid(s_i - s_j)
            g_sum += g
            if item_state[j, 0] < admit:  # not trained yet: it only passes its gradient on
                for k in range(dim):
                    g_neg[k] += g * V[j, k]
                continue
            if epoch:
                n_log = _log_item(V, item_bias, j, epoch, log, n_log)
            # gradient of V[j]: -g q - l2 V[j]; its squared norm from the dot products at hand
            g2 = (g * (g * qq + (l2 + l2) * dot) + l2 * l2 * vv) * inv_dim
            _step_negative(j, g, _rate(item_state, j, g2, negative_lr, decay, eps), q, g_neg, rows, item_dirty, steps)
        if seen_bits > 0 and mark_seen(user_seen, u, i, seen_bits):
            user_dirty[u] |= SEEN
        pos = _push_recent(recent, pos, i)
        if n_used == 0:
            continue
        # The event's own rows take one step on the gradient summed over its negatives (L2 summed alike).
        l2_sum = np.float32(l2 * n_used)
        gg, gu, uu = _own_gradient(u, i, g_sum, g_neg, g_q, rows)
        if user_state[u, 0] >= admit:  # gradient of U[u]: g_q - l2_sum U[u]
            g2 = (gg - (l2_sum + l2_sum) * gu + l2_sum * l2_sum * uu) * inv_dim
            _step_user(u, _rate(user_state, u, g2, lr, decay, eps), g_q, l2_sum, U, user_dirty)
        for t in range(context.shape[1]):
            c = context[e, t]
            if c >= 0 and ctx_state[c, 0] >= admit and _step(C, c, 1.0 / n_ctx, g_q, l2_sum, ctx_state, lr, decay, eps):
                ctx_dirty[c] |= VECTOR
        if item_state[i, 0] >= admit:  # gradient of V[i]: g_sum q - l2_sum V[i]
            if epoch:
                n_log = _log_item(V, item_bias, i, epoch, log, n_log)
            g2 = (g_sum * (g_sum * qq - (l2_sum + l2_sum) * qv) + l2_sum * l2_sum * vv_i) * inv_dim
            _step_item(i, _rate(item_state, i, g2, lr, decay, eps), g_sum, q, l2_sum, V, item_dirty)
            if bias_lr > 0.0:
                item_bias[i, 0] += bias_lr * g_sum
                item_dirty[i] |= BIAS
    rng[0], cursor[0] = draw, pos
    log[3][0] = n_log


@njit(cache=True, fastmath=FAST)
def rewind(S, Q, log_epoch, log_item, log_row, n_log):
    """Scores S [R, n] of the final rows, turned into each scored row's own time: for an item changed
    after row r was scored, row r takes the row as logged at its first change after r. Walking the log
    backwards, the earliest such entry is written last."""
    dim = Q.shape[1]
    for t in range(n_log - 1, -1, -1):
        j = log_item[t]
        if j >= S.shape[1]:
            continue
        for r in range(log_epoch[t]):
            s = log_row[t, dim]
            for k in range(dim):
                s += Q[r, k] * log_row[t, k]
            S[r, j] = s
