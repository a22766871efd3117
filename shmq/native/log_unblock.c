/*
 * Dead claims and housekeeping: find a frame stuck "claimed" (its producer
 * died or stopped between claim and commit) or a segment whose sealer died,
 * and replace the gap with a padding frame after the unblock timeout; the
 * housekeeping step also rolls sealed segments and prepares the next slot.
 * The policy (when: the same frame blocked for unblock_timeout_ns) is in
 * walk_and_unblock; the mechanism (how) is unblock_at.
 *
 * Invariants relied on:
 *  - One unblocker at a time per log: header.unblock_owner is taken by CAS
 *    (0 or a dead pid -> our pid) and released with a release store.
 *  - Fencing a late producer: a claimed data header is CASed to FENCED, so
 *    its commit CAS fails; every zero word of the gap is CASed to POISON, so
 *    a producer that claimed but has not yet written its header fails that
 *    CAS and retries. Padding is published with a release store of its
 *    header, after the empty batch it carries is written.
 *  - A padding header carries the relative offset that follows it, so the
 *    offsets of void claims are skipped, never reused.
 *  - A sealer that died before its seal CAS: once the segment is full and
 *    nothing was claimed beyond the gap, the unblocker makes the seal (one
 *    CAS from 0; whoever wins, the seal's value is the truth).
 */
#define _GNU_SOURCE
#include <unistd.h>

#include "log_internal.h"

/* ------------------------------------------------------------ unblocking */

static int lock_unblocker(shmq_log *log)
{
    uint32_t me = (uint32_t)getpid();
    uint32_t cur = __atomic_load_n(&log->hdr->unblock_owner, __ATOMIC_ACQUIRE);
    if (cur == me)
        return 0;
    if (cur != 0 && !pid_dead(cur))
        return 0;
    return __atomic_compare_exchange_n(&log->hdr->unblock_owner, &cur, me, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}

static void unlock_unblocker(shmq_log *log)
{
    __atomic_store_n(&log->hdr->unblock_owner, 0, __ATOMIC_RELEASE);
}

/* Replace the incomplete frame at pos (relative offset rel) of segment seq
 * with padding, fencing any late producer: its claimed header is fenced and
 * every unclaimed word of the gap is poisoned, so its CAS fails. Finishes the
 * segment's seal when the dead claim was the sealer's. Returns 1 if padded
 * or sealed, 0 if nothing was needed, or an error. Caller holds the lock. */
static int unblock_at(shmq_log *log, uint64_t seq, uint64_t pos, uint32_t rel)
{
    uint32_t i = (uint32_t)(seq % log->n);
    shmq_ctl_slot *slot = &log->slots[i];
    if (ld_acq(&slot->state_seq) != ss_make(seq, SHMQ_SLOT_ACTIVE))
        return 0;
    int64_t base = __atomic_load_n(&slot->base_offset, __ATOMIC_RELAXED);
    uint64_t *w = frame_word(log, i, pos);
    uint64_t h = ld_acq(w);
    uint64_t scan;
    if (fh_len(h) > 0)
        return 0; /* completed meanwhile */
    if (h == 0 || h == POISON) {
        if (h == 0 && !cas64(w, 0, POISON))
            return 0;
        scan = pos + 8;
    } else {
        /* INT32_MIN has no negation: scribbled, and refused below as too short. */
        int32_t len = fh_len(h) == INT32_MIN ? 0 : -fh_len(h);
        if (fh_len(h) >= 0 || len < SHMQ_MIN_FRAME || len % 8 || pos + (uint64_t)len > log->cap || fh_rel(h) != rel)
            return set_error(log, SHMQ_ERR_CORRUPT, seq, pos, base + rel);
        if (fh_type(h) == SHMQ_FRAME_DATA && !cas64(w, h, fh_make(-len, rel, SHMQ_FRAME_FENCED)))
            return 0; /* committed just now */
        scan = pos + (uint64_t)len;
    }
    uint64_t c = ld_acq(&slot->claim);
    uint64_t limit = claim_pos(c) < log->cap ? claim_pos(c) : log->cap;
    uint64_t q = 0;
    int64_t rel_q = -1;
    for (uint64_t p = scan; p + 8 <= limit; p += 8) {
        uint64_t *wp = frame_word(log, i, p);
        uint64_t v = ld_acq(wp);
        if (v == 0 && cas64(wp, 0, POISON))
            continue;
        v = ld_acq(wp);
        if (v == POISON)
            continue;
        /* The first word after the gap that someone else wrote is a header. */
        int32_t vl = fh_len(v) == INT32_MIN ? 0 : fh_len(v) < 0 ? -fh_len(v) : fh_len(v);
        if (vl < SHMQ_MIN_FRAME || vl % 8 || p + (uint64_t)vl > log->cap || fh_rel(v) < rel)
            return set_error(log, SHMQ_ERR_CORRUPT, seq, p, base + rel);
        q = p;
        rel_q = fh_rel(v);
        break;
    }
    if (rel_q < 0) {
        if (claim_pos(c) > log->cap) {
            /* The segment is full and nobody claimed beyond pos: the sealer
             * died before sealing, or sealed further on. */
            cas64(&slot->seal, 0, seal_make(rel, pos));
            uint64_t seal = ld_acq(&slot->seal);
            if (seal_size(seal) == pos)
                return 1;
            q = seal_size(seal);
            rel_q = seal_count(seal);
            if (q < pos + SHMQ_MIN_FRAME)
                return set_error(log, SHMQ_ERR_CORRUPT, seq, pos, base + rel);
        } else {
            q = limit;
            rel_q = claim_count(c);
        }
    }
    if (q < pos + SHMQ_MIN_FRAME || rel_q < rel)
        return set_error(log, SHMQ_ERR_CORRUPT, seq, pos, base + rel);
    uint32_t count = (uint32_t)(rel_q - rel);
    shmq_batch_encode_empty((uint8_t *)(w + 1), SHMQ_BATCH_HEADER_SIZE, base + rel, count ? count : 1, shmq_wall_ms());
    /* The padding header carries the relative offset that follows it. */
    st_rel(w, fh_make((int32_t)(q - pos), (uint32_t)rel_q, SHMQ_FRAME_PADDING));
    wake_readers(log);
    return 1;
}

/* Walk complete frames from st's remembered place; if the walk is stuck at
 * the same incomplete frame for longer than the unblock timeout, unblock it. */
static int64_t walk_and_unblock(shmq_log *log, uint64_t seq, uint64_t pos, int64_t rel, shmq_unblock_state *st)
{
    for (int hops = 0; hops < (int)log->n + 1; hops++) {
        uint32_t i = (uint32_t)(seq % log->n);
        shmq_ctl_slot *slot = &log->slots[i];
        uint64_t ss = ld_acq(&slot->state_seq);
        if (ss != ss_make(seq, SHMQ_SLOT_ACTIVE))
            return 0;
        int64_t base = __atomic_load_n(&slot->base_offset, __ATOMIC_RELAXED);
        while (pos < log->cap) {
            uint64_t h = ld_acq(frame_word(log, i, pos));
            if (fh_len(h) <= 0)
                break;
            int64_t len = frame_len_checked(log, h, pos);
            if (len < 0 || !frame_rel_ok(h, rel))
                return recycled(slot, ss) ? 0 : set_error(log, SHMQ_ERR_CORRUPT, seq, pos, base + rel);
            if (fh_type(h) == SHMQ_FRAME_DATA) {
                int64_t n = frame_records(log, i, pos);
                if (n < 0)
                    return recycled(slot, ss) ? 0 : set_error(log, SHMQ_ERR_CORRUPT, seq, pos, base + rel);
                rel = fh_rel(h) + n;
            } else {
                rel = fh_rel(h);
            }
            pos += (uint64_t)len;
        }
        st->walk_seq = seq;
        st->walk_pos = pos;
        st->walk_rel = rel;
        uint64_t seal = ld_acq(&slot->seal);
        if (seal && pos >= seal_size(seal)) {
            if (ld_acq(&log->hdr->active_seq) <= seq)
                return shmq__advance(log, seq) == SHMQ_OK ? 0 : 0;
            seq++;
            pos = 0;
            rel = 0;
            continue;
        }
        uint64_t c = ld_acq(&slot->claim);
        if (claim_pos(c) <= pos && !(claim_pos(c) > log->cap)) {
            st->since_ns = 0;
            return 0; /* caught up: nothing is blocked */
        }
        /* Blocked at pos: an incomplete frame, or a seal still to be made. */
        int64_t now = shmq_now_ns();
        if (st->seq != seq || st->pos != pos || st->since_ns == 0) {
            st->seq = seq;
            st->pos = pos;
            st->since_ns = now;
            return 0;
        }
        if (now - st->since_ns < (int64_t)log->unblock_timeout_ns)
            return 0;
        if (!lock_unblocker(log))
            return 0;
        int rc = unblock_at(log, seq, pos, (uint32_t)rel);
        unlock_unblocker(log);
        if (rc < 0 && recycled(slot, ss))
            rc = 0;
        st->since_ns = 0;
        return rc;
    }
    return 0;
}

static int64_t housekeep_body(shmq_log *log, shmq_unblock_state *st)
{
    uint64_t s = ld_acq(&log->hdr->active_seq);
    shmq__advance(log, s);
    s = ld_acq(&log->hdr->active_seq);
    int rc = shmq__prepare_slot(log, s + 1);
    if (rc != SHMQ_OK && rc != SHMQ_ERR_RETRY && rc != SHMQ_ERR_TIMEOUT)
        return rc;
    uint64_t seq = st->walk_seq, pos = st->walk_pos;
    int64_t rel = st->walk_rel;
    shmq_ctl_slot *slot = slot_of(log, seq);
    if (seq > s || ld_acq(&slot->state_seq) != ss_make(seq, SHMQ_SLOT_ACTIVE) || pos > log->cap) {
        seq = s;
        pos = 0;
        rel = 0;
    }
    return walk_and_unblock(log, seq, pos, rel, st);
}

static int64_t unblock_cursor_body(shmq_log *log, const shmq_cursor *cur, shmq_unblock_state *st)
{
    return walk_and_unblock(log, cur->seq, cur->pos, cur->rel, st);
}

/* ------------------------------------------- public entry points, guarded
 * (log_guard.c: a file shrunk or gone under us is SHMQ_ERR_STORAGE) */

int64_t shmq_log_housekeep(shmq_log *log, shmq_unblock_state *st)
{
    SHMQ_GUARDED_RETURN(int64_t, log, housekeep_body(log, st), 0);
}

int64_t shmq_log_unblock_cursor(shmq_log *log, const shmq_cursor *cur, shmq_unblock_state *st)
{
    SHMQ_GUARDED_RETURN(int64_t, log, unblock_cursor_body(log, cur, st), 0);
}
