/*
 * Appends: the slot lifecycle (clean, prepare, activate, advance past a
 * sealed segment) and the claim / write / commit protocol of frames, with
 * the append entry points (one record, a batch, a raw batch).
 *
 * Invariants relied on (see log_internal.h for the full list):
 *  - slot.claim: any producer, one fetch-add (acq_rel) of
 *    (count << 32 | frame_len), between two acquire loads of state_seq that
 *    must both read the same ACTIVE generation, else the add is void (it
 *    may belong to the generation after a whole ring turn). An add on a
 *    slot that is not ACTIVE is wiped by the activator's exchange while the
 *    slot is ACTIVATING, before the release store that publishes it ACTIVE.
 *  - slot.state_seq: changed only by CAS (cleaner, activator) or a release
 *    store by the CAS winner. clean_slot issues a fence after the new
 *    generation is visible and before zeroing any byte (seqlock writer).
 *    A CLEANING or ACTIVATING owner that died (owner_pid) is taken over by
 *    CAS on owner_pid.
 *  - frame header words: the claimant CASes 0 -> "claimed" (a negative
 *    length); a failed CAS means an unblocker poisoned the word and the
 *    claim is void. The commit is a release CAS claimed -> complete, after
 *    the batch bytes, the indexes and the max timestamp are written; a
 *    failed commit means the frame was fenced (SHMQ_ERR_FENCED).
 *  - slot.seal: one CAS from 0 by the claim that crossed the segment end;
 *    whoever wrote it, its value is where the segment ends.
 *  - header.active_seq: CAS seq -> seq+1 by whoever activates seq+1; every
 *    step is idempotent, so any producer (or reader) can help a roll along.
 *  - Block mode: a sealed segment's slot is recycled only when the
 *    retention floor (log_readers.c: the groups' committed floor and every
 *    live tethered reader's position, seq_cst loads) is at or past the
 *    segment's end. A producer that finds it short sleeps on space_seq
 *    (shmq__wait_for_space), registered in space_waiters before it looks
 *    again, so a reader that moves after that look always wakes it.
 *  - After a commit, waiters is read seq_cst (wake_readers) so a sleeping
 *    reader is never missed.
 */
#define _GNU_SOURCE
#include <string.h>
#include <unistd.h>

#include "log_internal.h"

/* ------------------------------------------------------- slot lifecycle */

/* Zero a slot's segment and indexes for generation seq. Caller won the CAS
 * to (seq, CLEANING) or took it over from a dead owner. */
static void clean_slot(shmq_log *log, shmq_ctl_slot *slot, uint64_t seq)
{
    uint32_t i = (uint32_t)(seq % log->n);
    /* Seqlock writer: the new generation is visible before any byte changes. */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    memset(log->seg[i], 0, log->cap);
    memset(log->idx[i], 0, index_bytes(log->cap, log->interval));
    memset(log->tidx[i], 0, tindex_bytes(log->cap, log->interval));
    st_rel(&slot->seal, 0);
    __atomic_store_n(&slot->max_timestamp, INT64_MIN, __ATOMIC_RELAXED);
    slot->changed_ns = shmq_now_ns();
    st_rel(&slot->state_seq, ss_make(seq, SHMQ_SLOT_CLEAN));
}

/* The offset one past the last record of a sealed segment, or -1. */
static int64_t segment_end(shmq_ctl_slot *slot)
{
    uint64_t seal = ld_acq(&slot->seal);
    if (!seal)
        return -1;
    return __atomic_load_n(&slot->base_offset, __ATOMIC_RELAXED) + seal_count(seal);
}

/* Make the slot of segment t CLEAN (or find it already CLEAN/ACTIVE).
 * Returns SHMQ_OK, SHMQ_ERR_RETRY (someone else is on it) or
 * SHMQ_ERR_TIMEOUT meaning "no space yet" in block mode. */
int shmq__prepare_slot(shmq_log *log, uint64_t t)
{
    shmq_ctl_slot *slot = slot_of(log, t);
    uint64_t ss = ld_acq(&slot->state_seq);
    uint64_t seq = ss_seq(ss);
    uint32_t state = ss_state(ss);
    if (seq == t && (state == SHMQ_SLOT_CLEAN || state == SHMQ_SLOT_ACTIVE || state == SHMQ_SLOT_ACTIVATING))
        return SHMQ_OK;
    if (seq == t && state == SHMQ_SLOT_CLEANING) {
        uint32_t owner = __atomic_load_n(&slot->owner_pid, __ATOMIC_ACQUIRE);
        if (!pid_dead(owner) || !__atomic_compare_exchange_n(&slot->owner_pid, &owner, (uint32_t)getpid(), 0,
                                                             __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
            return SHMQ_ERR_RETRY;
        clean_slot(log, slot, t);
        return SHMQ_OK;
    }
    if (seq > t || (state != SHMQ_SLOT_ACTIVE && state != SHMQ_SLOT_EMPTY && state != SHMQ_SLOT_CLEAN))
        return SHMQ_ERR_RETRY;
    if (state == SHMQ_SLOT_ACTIVE) {
        /* The slot holds an older segment: it must be sealed to be recycled,
         * and in block mode every consumer must have moved past it. */
        int64_t end = segment_end(slot);
        if (end < 0)
            return SHMQ_ERR_RETRY;
        if ((log->flags & SHMQ_FLAG_OVERFLOW_BLOCK) && shmq_log_retention_floor(log, NULL) < end)
            return SHMQ_ERR_TIMEOUT;
    }
    if (!cas64(&slot->state_seq, ss, ss_make(t, SHMQ_SLOT_CLEANING)))
        return SHMQ_ERR_RETRY;
    __atomic_store_n(&slot->owner_pid, (uint32_t)getpid(), __ATOMIC_RELEASE);
    clean_slot(log, slot, t);
    return SHMQ_OK;
}

/* Activate segment t = s + 1 (its slot is CLEAN) with the given base offset
 * and move active_seq from s to t. Idempotent across helpers. */
static int activate(shmq_log *log, uint64_t s, int64_t base)
{
    uint64_t t = s + 1;
    shmq_ctl_slot *slot = slot_of(log, t);
    uint64_t ss = ld_acq(&slot->state_seq);
    if (ss == ss_make(t, SHMQ_SLOT_CLEAN)) {
        if (!cas64(&slot->state_seq, ss, ss_make(t, SHMQ_SLOT_ACTIVATING)))
            return SHMQ_ERR_RETRY;
        __atomic_store_n(&slot->owner_pid, (uint32_t)getpid(), __ATOMIC_RELEASE);
    } else if (ss == ss_make(t, SHMQ_SLOT_ACTIVATING)) {
        uint32_t owner = __atomic_load_n(&slot->owner_pid, __ATOMIC_ACQUIRE);
        if (!pid_dead(owner) || !__atomic_compare_exchange_n(&slot->owner_pid, &owner, (uint32_t)getpid(), 0,
                                                             __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
            return SHMQ_ERR_RETRY;
    } else if (ss != ss_make(t, SHMQ_SLOT_ACTIVE)) {
        return SHMQ_ERR_RETRY;
    }
    if (ss_state(ss) != SHMQ_SLOT_ACTIVE) {
        /* Stale fetch-adds on this slot's claim word (from producers that
         * slept through a whole ring turn) are wiped here; they re-check the
         * state after their fetch-add and see it was not ACTIVE. */
        __atomic_exchange_n(&slot->claim, 0, __ATOMIC_SEQ_CST);
        __atomic_store_n(&slot->base_offset, base, __ATOMIC_RELAXED);
        __atomic_store_n(&slot->seal, 0, __ATOMIC_RELAXED);
        slot->changed_ns = shmq_now_ns();
        st_rel(&slot->state_seq, ss_make(t, SHMQ_SLOT_ACTIVE));
    }
    cas64(&log->hdr->active_seq, s, t);
    wake_readers(log);
    return SHMQ_OK;
}

/* If segment s is sealed and still active, prepare and activate s+1. */
int shmq__advance(shmq_log *log, uint64_t s)
{
    shmq_ctl_slot *slot = slot_of(log, s);
    if (ld_acq(&log->hdr->active_seq) != s)
        return SHMQ_OK;
    if (ld_acq(&slot->state_seq) != ss_make(s, SHMQ_SLOT_ACTIVE))
        return SHMQ_ERR_RETRY;
    int64_t end = segment_end(slot);
    if (end < 0)
        return SHMQ_ERR_RETRY;
    int rc = shmq__prepare_slot(log, s + 1);
    if (rc != SHMQ_OK)
        return rc;
    return activate(log, s, end);
}

/* Is the ring still too full to move past segment s? (shmq__wait_for_space's re-check) */
static int ring_full(shmq_log *log, uint64_t s)
{
    return shmq__advance(log, s) == SHMQ_ERR_TIMEOUT;
}

/* Wait until segment s is no longer the active one, helping it along. */
static int await_next_segment(shmq_log *log, uint64_t s, int64_t deadline)
{
    shmq_unblock_state st = { 0 };
    int blocked = 0;
    for (int round = 0;; round++) {
        if (ld_acq(&log->hdr->active_seq) != s)
            return SHMQ_OK;
        int rc = shmq__advance(log, s);
        if (rc == SHMQ_OK)
            continue;
        if (rc == SHMQ_ERR_TIMEOUT) {
            /* Block mode, the ring is full of what readers still need: sleep
             * until one moves (or dies), up to the deadline. */
            if (!blocked++)
                __atomic_fetch_add(&log->hdr->blocked_count, 1, __ATOMIC_RELAXED);
            if (shmq__wait_for_space(log, ring_full, s, deadline) != SHMQ_OK)
                return SHMQ_ERR_TIMEOUT;
            continue;
        }
        if (rc != SHMQ_ERR_RETRY)
            return rc;
        if (round > 256 && round % 64 == 0) {
            /* A sealer may have died between its claim and its seal. */
            int64_t hk = shmq_log_housekeep(log, &st);
            if (hk < 0 && hk != SHMQ_ERR_RETRY)
                return (int)hk;
        }
        if (deadline >= 0 && shmq_now_ns() > deadline)
            return SHMQ_ERR_TIMEOUT;
        relax(round);
    }
}

/* ------------------------------------------------------------- append */

static void fault_point(shmq_log *log, int kind)
{
    if (log->fault_kind != kind || log->claims != log->fault_after)
        return;
    if (kind == FAULT_STOP_AFTER_ADD) {
        log->fault_kind = FAULT_NONE; /* once: the add it stops after may be void */
        raise(SIGSTOP);
    } else if (kind == FAULT_STOP_AFTER_CLAIM)
        raise(SIGSTOP);
    else
        raise(SIGKILL);
}

/* Claim frame_len bytes and count offsets in the active segment, sealing it
 * and moving on when it is full. On success the frame header reads
 * "claimed" and c->base_offset is the first offset of the claim. */
int shmq__claim_frame(shmq_log *log, uint32_t frame_len, uint32_t count, int64_t deadline, claim_t *c, int copy)
{
    const uint64_t add = ((uint64_t)count << 32) | frame_len;
    int inactive = 0; /* looks at a slot that was not ACTIVE */
    for (;;) {
        /* Written rarely, read-mostly: this line stays shared in every cache.
         * The replication copy (copy != 0) appends whatever the state. */
        uint32_t st = __atomic_load_n(&log->hdr->append_state, __ATOMIC_ACQUIRE);
        if (st != SHMQ_APPEND_OPEN && !copy)
            return st == SHMQ_APPEND_DELETED ? SHMQ_ERR_DELETED : SHMQ_ERR_NOT_LEADER;
        uint64_t s = ld_acq(&log->hdr->active_seq);
        shmq_ctl_slot *slot = slot_of(log, s);
        /* Do not pile overflow onto a full segment: each overflowing claim
         * adds to the 32-bit position field. */
        if (claim_pos(ld_rlx(&slot->claim)) > log->cap) {
            int rc = await_next_segment(log, s, deadline);
            if (rc != SHMQ_OK)
                return rc;
            continue;
        }
        /* The generation is read on both sides of the fetch-add: a producer
         * that sleeps between its look at active_seq and its add (or between
         * the add and the check) can see the slot go round the ring. Equal
         * reads mean one generation throughout (seq only grows), so the add
         * landed in that generation's claim word: its exchange (ACTIVATING)
         * came before the first read and the next one's after the second.
         * Different reads leave it unknown which generation took the add:
         * it is given up (a hole the unblocker pads, or an add on a slot
         * being recycled, which the activator's exchange wipes). */
        uint64_t ss = ld_acq(&slot->state_seq);
        if (ss_state(ss) != SHMQ_SLOT_ACTIVE) {
            /* Being recycled: look at active_seq again. If that lasts (a
             * garbage control block), wait as for a full segment: bounded by
             * the deadline, helping housekeeping along. */
            if (++inactive % 64 == 0) {
                int rc = await_next_segment(log, s, deadline);
                if (rc != SHMQ_OK)
                    return rc;
            }
            relax(inactive);
            continue;
        }
        uint64_t old = __atomic_fetch_add(&slot->claim, add, __ATOMIC_ACQ_REL);
        fault_point(log, FAULT_STOP_AFTER_ADD);
        if (ld_acq(&slot->state_seq) != ss)
            continue; /* the slot turned under the add: the claim is void */
        uint64_t seq = ss_seq(ss);
        uint64_t pos = claim_pos(old);
        uint32_t rel = claim_count(old);
        if (pos + frame_len <= log->cap) {
            c->index = (uint32_t)(seq % log->n);
            c->pos = pos;
            c->rel = rel;
            c->len = frame_len;
            c->count = count;
            c->word = frame_word(log, c->index, pos);
            log->claims++;
            fault_point(log, FAULT_KILL_BEFORE_HEADER);
            if (!cas64(c->word, 0, fh_make(-(int32_t)frame_len, rel, SHMQ_FRAME_DATA)))
                continue; /* poisoned by an unblocker: the claim is void */
            c->base_offset = __atomic_load_n(&slot->base_offset, __ATOMIC_RELAXED) + rel;
            return SHMQ_OK;
        }
        if (pos <= log->cap) /* this claim crossed the end: it is the sealer */
            cas64(&slot->seal, 0, seal_make(rel, pos));
        int rc = await_next_segment(log, seq, deadline);
        if (rc != SHMQ_OK)
            return rc;
    }
}

static void write_indexes(shmq_log *log, const claim_t *c, int64_t max_ts)
{
    uint64_t first = (c->pos + log->interval - 1) / log->interval;
    uint64_t last = (c->pos + c->len - 1) / log->interval;
    uint64_t entry = ((c->pos / 8 + 1) << 32) | c->rel;
    for (uint64_t k = first; k <= last && k < log->index_entries; k++) {
        __atomic_store_n(&log->tidx[c->index][2 * k], (uint64_t)max_ts, __ATOMIC_RELAXED);
        st_rel(&log->tidx[c->index][2 * k + 1], entry);
        st_rel(&log->idx[c->index][k], entry);
    }
}

/* Publish a written frame: indexes, max timestamp, then the commit CAS of
 * the claimed header to `final`. */
static inline int commit_word(shmq_log *log, claim_t *c, int64_t max_ts, uint64_t final)
{
    if (c->pos % log->interval == 0 || c->pos / log->interval != (c->pos + c->len - 1) / log->interval)
        write_indexes(log, c, max_ts);
    shmq_ctl_slot *slot = &log->slots[c->index];
    int64_t cur = __atomic_load_n(&slot->max_timestamp, __ATOMIC_RELAXED);
    while (max_ts > cur && !__atomic_compare_exchange_n(&slot->max_timestamp, &cur, max_ts, 1,
                                                        __ATOMIC_RELAXED, __ATOMIC_RELAXED))
        ;
    fault_point(log, FAULT_KILL_AFTER_CLAIM);
    fault_point(log, FAULT_STOP_AFTER_CLAIM);
    if (!cas64(c->word, fh_make(-(int32_t)c->len, c->rel, SHMQ_FRAME_DATA), final))
        return SHMQ_ERR_FENCED;
    wake_readers(log);
    return SHMQ_OK;
}

static int commit_frame(shmq_log *log, claim_t *c, int64_t max_ts)
{
    return commit_word(log, c, max_ts, fh_make((int32_t)c->len, c->rel, SHMQ_FRAME_DATA));
}

/* The same for the replication copy in log_replica.c (the appenders above
 * keep the inline versions on their hot path). */
int shmq__commit_word(shmq_log *log, claim_t *c, int64_t max_ts, uint64_t final)
{
    return commit_word(log, c, max_ts, final);
}

int shmq__commit_frame(shmq_log *log, claim_t *c, int64_t max_ts)
{
    return commit_frame(log, c, max_ts);
}

/* Replicated logs: stamp partitionLeaderEpoch (not covered by the CRC) into
 * a producer's batch before its commit. One load per append. */
static inline void stamp_epoch(shmq_log *log, claim_t *c)
{
    if (__atomic_load_n(&log->hdr->replicated, __ATOMIC_RELAXED)) {
        uint32_t e = __builtin_bswap32(__atomic_load_n(&log->hdr->leader_epoch, __ATOMIC_RELAXED));
        memcpy((uint8_t *)(c->word + 1) + SHMQ_BATCH_OFF_LEADER_EPOCH, &e, 4);
    }
}

static int check_frame_len(int64_t batch_len)
{
    if (batch_len < SHMQ_BATCH_HEADER_SIZE)
        return SHMQ_ERR_ARG;
    return 0;
}

static int64_t append1_body(shmq_log *log, const char *key_, int64_t key_len,
                         const char *value_, int64_t value_len,
                         const char *headers_, int64_t headers_len,
                         int64_t timestamp, int64_t *timestamp_out, int64_t timeout_ns)
{
    const uint8_t *key = (const uint8_t *)key_, *value = (const uint8_t *)value_;
    const uint8_t *headers = (const uint8_t *)headers_;
    int64_t blen = shmq_batch_size1(key_len, value_len, headers_len);
    if (blen < 0 || check_frame_len(blen))
        return SHMQ_ERR_ARG;
    uint64_t flen = align8((uint64_t)blen + SHMQ_FRAME_HEADER_SIZE);
    if (flen > log->cap || flen > MAX_FRAME_BYTES)
        return SHMQ_ERR_TOO_LARGE;
    if (timestamp < 0)
        timestamp = shmq_wall_ms();
    if (timestamp_out)
        *timestamp_out = timestamp;
    static const shmq_batch_meta plain = { -1, -1, -1, 0, -1 };
    int64_t deadline = shmq_deadline(timeout_ns);
    for (;;) {
        claim_t c;
        int rc = shmq__claim_frame(log, (uint32_t)flen, 1, deadline, &c, 0);
        if (rc != SHMQ_OK)
            return rc;
        shmq_batch_encode1((uint8_t *)(c.word + 1), blen, c.base_offset, timestamp, key, key_len,
                           value, value_len, headers, headers_len, &plain);
        stamp_epoch(log, &c);
        if (commit_frame(log, &c, timestamp) == SHMQ_OK)
            return c.base_offset;
    }
}

int64_t shmq_log_append_value(shmq_log *log, const char *value, int64_t value_len)
{
    return shmq_log_append1(log, NULL, -1, value, value_len, NULL, 0, -1, NULL, -1);
}

int64_t shmq_log_append_kv(shmq_log *log, const char *key, int64_t key_len, const char *value, int64_t value_len,
                           int64_t timestamp, int64_t timeout_ns)
{
    return shmq_log_append1(log, key, key_len, value, value_len, NULL, 0, timestamp, NULL, timeout_ns);
}

static int64_t append_body(shmq_log *log, const shmq_records *r, const shmq_batch_meta *meta, int64_t timeout_ns)
{
    static const shmq_batch_meta plain = { -1, -1, -1, 0, -1 };
    if (!r || r->count == 0)
        return SHMQ_ERR_ARG;
    int64_t blen = shmq_batch_size(r);
    if (blen < 0 || check_frame_len(blen))
        return blen < 0 ? blen : SHMQ_ERR_ARG;
    uint64_t flen = align8((uint64_t)blen + SHMQ_FRAME_HEADER_SIZE);
    if (flen > log->cap || flen > MAX_FRAME_BYTES || r->count > SHMQ_MAX_RECORDS_PER_SEGMENT)
        return SHMQ_ERR_TOO_LARGE;
    int64_t max_ts = r->base_timestamp;
    if (r->timestamps)
        for (uint32_t i = 0; i < r->count; i++)
            if (r->timestamps[i] > max_ts)
                max_ts = r->timestamps[i];
    int64_t deadline = shmq_deadline(timeout_ns);
    for (;;) {
        claim_t c;
        int rc = shmq__claim_frame(log, (uint32_t)flen, r->count, deadline, &c, 0);
        if (rc != SHMQ_OK)
            return rc;
        shmq_batch_encode((uint8_t *)(c.word + 1), blen, r, c.base_offset, meta ? meta : &plain);
        stamp_epoch(log, &c);
        if (commit_frame(log, &c, max_ts) == SHMQ_OK)
            return c.base_offset;
    }
}

static int64_t append_raw_body(shmq_log *log, const uint8_t *batch, int64_t len, int64_t timeout_ns)
{
    int64_t blen = shmq_batch_check(batch, len, 1);
    if (blen < 0)
        return blen;
    if (blen != len)
        return SHMQ_ERR_ARG;
    int32_t lod = be32(batch + SHMQ_BATCH_OFF_LAST_OFFSET_DELTA);
    if (lod < 0 || lod >= (int32_t)SHMQ_MAX_RECORDS_PER_SEGMENT)
        return SHMQ_ERR_ARG;
    uint64_t flen = align8((uint64_t)blen + SHMQ_FRAME_HEADER_SIZE);
    if (flen > log->cap || flen > MAX_FRAME_BYTES)
        return SHMQ_ERR_TOO_LARGE;
    int64_t max_ts = be64(batch + SHMQ_BATCH_OFF_MAX_TIMESTAMP);
    int64_t deadline = shmq_deadline(timeout_ns);
    for (;;) {
        claim_t c;
        int rc = shmq__claim_frame(log, (uint32_t)flen, (uint32_t)lod + 1, deadline, &c, 0);
        if (rc != SHMQ_OK)
            return rc;
        memcpy(c.word + 1, batch, (size_t)blen);
        shmq_batch_set_base_offset((uint8_t *)(c.word + 1), c.base_offset);
        stamp_epoch(log, &c);
        if (commit_frame(log, &c, max_ts) == SHMQ_OK)
            return c.base_offset;
    }
}

/* ------------------------------------------- public entry points, guarded
 * (log_guard.c: a file shrunk or gone under us is SHMQ_ERR_STORAGE) */

int64_t shmq_log_append1(shmq_log *log, const char *key_, int64_t key_len,
                         const char *value_, int64_t value_len,
                         const char *headers_, int64_t headers_len,
                         int64_t timestamp, int64_t *timestamp_out, int64_t timeout_ns)
{
    SHMQ_GUARDED_RETURN(int64_t, log, append1_body(log, key_, key_len, value_, value_len, headers_, headers_len, timestamp, timestamp_out, timeout_ns), 0);
}

int64_t shmq_log_append(shmq_log *log, const shmq_records *r, const shmq_batch_meta *meta, int64_t timeout_ns)
{
    SHMQ_GUARDED_RETURN(int64_t, log, append_body(log, r, meta, timeout_ns), 0);
}

int64_t shmq_log_append_raw(shmq_log *log, const uint8_t *batch, int64_t len, int64_t timeout_ns)
{
    SHMQ_GUARDED_RETURN(int64_t, log, append_raw_body(log, batch, len, timeout_ns), 0);
}
