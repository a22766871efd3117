/*
 * Replication: append state and replication words of the control block,
 * follower LEOs and the high watermark, the copy of a leader's raw frames
 * into a follower's log, leader-epoch extraction, truncation and reset to an
 * offset, and the incremental flush (msync) to disk.
 *
 * Invariants relied on:
 *  - header.append_state: release store, then commit_seq and hw_seq are
 *    bumped (seq_cst) and both futexes woken, so every waiter re-checks.
 *  - header.replica_leo[r]: written only by replica r, (epoch & 0xFFFF) << 48
 *    | LEO with release; an LEO tagged with another epoch counts as 0.
 *  - header.high_watermark: only grows (CAS-max, seq_cst) except when a
 *    truncation or reset moves it down; every change bumps hw_seq, and
 *    growth wakes hw waiters and readers.
 *  - The frame copy has a single writer (the follower): a claim whose base
 *    offset is not the log's end means someone else appended, and the claim
 *    is voided with padding (SHMQ_ERR_DIVERGED). The copy uses the same
 *    claim/commit protocol as producers (log_append.c), so readers of a
 *    follower need no other rule.
 *  - Truncation and reset run in the single writer of a follower (or of a
 *    leader taking over) while no producer appends: they store words with
 *    release, and state_seq stores make readers of later segments re-seek.
 *  - The flush position (flushed_seq, flushed_pos) is private to the handle.
 */
#define _GNU_SOURCE
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "log_internal.h"

/* ----------------------------------------------------------- replication */

#define LEO_MASK ((1ULL << 48) - 1)

static void set_append_state_body(shmq_log *log, uint32_t state)
{
    shmq_ctl_header *h = log->hdr;
    __atomic_store_n(&h->append_state, state, __ATOMIC_RELEASE);
    __atomic_fetch_add(&h->commit_seq, 1, __ATOMIC_SEQ_CST);
    __atomic_fetch_add(&h->hw_seq, 1, __ATOMIC_SEQ_CST);
    shmq_futex_wake(&h->commit_seq, INT_MAX);
    shmq_futex_wake(&h->hw_seq, INT_MAX);
}

static void set_replication_body(shmq_log *log, uint32_t replicated, uint32_t leader_epoch, uint32_t leader_index,
                              uint32_t isr_mask, int64_t epoch_start_offset)
{
    shmq_ctl_header *h = log->hdr;
    __atomic_store_n(&h->replicated, replicated ? 1u : 0u, __ATOMIC_RELEASE);
    __atomic_store_n(&h->leader_index, leader_index, __ATOMIC_RELEASE);
    __atomic_store_n(&h->isr_mask, isr_mask, __ATOMIC_RELEASE);
    __atomic_store_n(&h->epoch_start_offset, epoch_start_offset, __ATOMIC_RELEASE);
    __atomic_store_n(&h->leader_epoch, leader_epoch, __ATOMIC_RELEASE);
}

/* CAS-max the high watermark; on growth bump hw_seq and wake hw waiters and
 * readers. Returns the high watermark after. */
static int64_t hw_max(shmq_log *log, int64_t hw)
{
    shmq_ctl_header *h = log->hdr;
    int64_t cur = __atomic_load_n(&h->high_watermark, __ATOMIC_SEQ_CST);
    while (hw > cur) {
        if (__atomic_compare_exchange_n(&h->high_watermark, &cur, hw, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
            __atomic_fetch_add(&h->hw_seq, 1, __ATOMIC_SEQ_CST);
            if (__atomic_load_n(&h->hw_waiters, __ATOMIC_SEQ_CST))
                shmq_futex_wake(&h->hw_seq, INT_MAX);
            wake_readers(log);
            return hw;
        }
    }
    return cur;
}

/* Minimum LEO over the ISR members other than the leader (an LEO tagged
 * with another epoch counts as 0), capped at the end offset; -1 when the ISR
 * has no such member. */
static int64_t isr_min_leo(shmq_log *log)
{
    shmq_ctl_header *h = log->hdr;
    uint32_t mask = __atomic_load_n(&h->isr_mask, __ATOMIC_ACQUIRE);
    uint32_t leader = __atomic_load_n(&h->leader_index, __ATOMIC_ACQUIRE);
    uint64_t tag = __atomic_load_n(&h->leader_epoch, __ATOMIC_ACQUIRE) & 0xFFFF;
    int64_t hw = INT64_MAX;
    for (uint32_t r = 0; r < SHMQ_MAX_REPLICAS; r++) {
        if (!(mask >> r & 1) || r == leader)
            continue;
        uint64_t e = __atomic_load_n(&h->replica_leo[r], __ATOMIC_ACQUIRE);
        int64_t leo = (e >> 48) == tag ? (int64_t)(e & LEO_MASK) : 0;
        if (leo < hw)
            hw = leo;
    }
    if (hw == INT64_MAX)
        return -1;
    int64_t end = shmq_log_end_offset(log);
    return end >= 0 && hw > end ? end : hw;
}

static int64_t recompute_hw_body(shmq_log *log)
{
    int64_t hw = isr_min_leo(log);
    if (hw < 0)
        return __atomic_load_n(&log->hdr->high_watermark, __ATOMIC_ACQUIRE);
    return hw_max(log, hw);
}

static int64_t publish_leo_body(shmq_log *log, uint32_t replica_index, uint32_t epoch, int64_t leo, int caught_up)
{
    if (replica_index >= SHMQ_MAX_REPLICAS || leo < 0 || (uint64_t)leo > LEO_MASK)
        return SHMQ_ERR_ARG;
    shmq_ctl_header *h = log->hdr;
    __atomic_store_n(&h->replica_leo[replica_index], ((uint64_t)(epoch & 0xFFFF) << 48) | (uint64_t)leo,
                     __ATOMIC_RELEASE);
    if (caught_up)
        __atomic_store_n(&h->caught_up_ns[replica_index], shmq_now_ns(), __ATOMIC_RELEASE);
    return shmq_log_recompute_hw(log);
}

static int64_t advance_hw_body(shmq_log *log, int64_t hw)
{
    return hw_max(log, hw);
}

static int64_t high_watermark_body(shmq_log *log)
{
    if (__atomic_load_n(&log->hdr->replicated, __ATOMIC_ACQUIRE))
        return __atomic_load_n(&log->hdr->high_watermark, __ATOMIC_ACQUIRE);
    return shmq_log_end_offset(log);
}

static void mark_deleted_body(shmq_log *log)
{
    shmq_log_set_append_state(log, SHMQ_APPEND_DELETED);
}

/* One frame of a raw stream at buf[pos..len): checks every length before use.
 * Returns the frame length and sets *h, *count; or SHMQ_ERR_CORRUPT. */
static int64_t stream_frame(const uint8_t *buf, int64_t len, int64_t pos, uint64_t cap, uint64_t *h_out,
                            uint32_t *count_out)
{
    if (pos < 0 || len - pos < SHMQ_FRAME_HEADER_SIZE)
        return SHMQ_ERR_CORRUPT;
    uint64_t h;
    memcpy(&h, buf + pos, 8);
    int32_t flen = fh_len(h);
    uint32_t type = fh_type(h);
    uint32_t count = fh_rel(h);
    if (flen < SHMQ_MIN_FRAME || flen % SHMQ_FRAME_ALIGN || flen > len - pos || (uint64_t)flen > cap ||
        (uint32_t)flen > MAX_FRAME_BYTES || (type != SHMQ_FRAME_DATA && type != SHMQ_FRAME_PADDING) ||
        count > (uint32_t)flen)
        return SHMQ_ERR_CORRUPT;
    if (type == SHMQ_FRAME_DATA) {
        const uint8_t *b = buf + pos + SHMQ_FRAME_HEADER_SIZE;
        int64_t blen = shmq_batch_check(b, flen - SHMQ_FRAME_HEADER_SIZE, 0);
        if (blen < 0 || align8((uint64_t)blen + SHMQ_FRAME_HEADER_SIZE) != (uint32_t)flen)
            return SHMQ_ERR_CORRUPT;
        int32_t lod = be32(b + SHMQ_BATCH_OFF_LAST_OFFSET_DELTA);
        if (lod < 0 || (uint32_t)lod + 1 != count)
            return SHMQ_ERR_CORRUPT;
    }
    *h_out = h;
    *count_out = count;
    return flen;
}

static int64_t append_frames_body(shmq_log *log, const uint8_t *buf, int64_t len)
{
    if (!buf || len < 0)
        return SHMQ_ERR_ARG;
    int64_t end = shmq_log_end_offset(log);
    if (end < 0)
        return end;
    for (int64_t pos = 0; pos < len;) {
        uint64_t h;
        uint32_t count;
        int64_t flen = stream_frame(buf, len, pos, log->cap, &h, &count);
        if (flen < 0)
            return set_error(log, (int)flen, 0, (uint64_t)pos, end);
        const uint8_t *body = buf + pos + SHMQ_FRAME_HEADER_SIZE;
        int type = (int)fh_type(h);
        if (type == SHMQ_FRAME_DATA && be64(body) != end)
            return set_error(log, SHMQ_ERR_DIVERGED, 0, (uint64_t)pos, be64(body));
        claim_t c;
        /* Block mode: do not wait for good here; the caller copies again. */
        int rc = shmq__claim_frame(log, (uint32_t)flen, count, shmq_deadline(1000000000LL), &c, 1);
        if (rc != SHMQ_OK)
            return rc;
        if (c.base_offset != end) {
            /* Somebody else appended (the log was not the single writer):
             * void the claim and stop. */
            shmq_batch_encode_empty((uint8_t *)(c.word + 1), SHMQ_BATCH_HEADER_SIZE, c.base_offset,
                                    count ? (int32_t)count : 1, shmq_wall_ms());
            shmq__commit_word(log, &c, INT64_MIN, fh_make((int32_t)c.len, c.rel + count, SHMQ_FRAME_PADDING));
            return set_error(log, SHMQ_ERR_DIVERGED, 0, (uint64_t)pos, end);
        }
        if (type == SHMQ_FRAME_DATA) {
            memcpy(c.word + 1, body, (size_t)flen - SHMQ_FRAME_HEADER_SIZE);
            rc = shmq__commit_frame(log, &c, be64(body + SHMQ_BATCH_OFF_MAX_TIMESTAMP));
        } else {
            shmq_batch_encode_empty((uint8_t *)(c.word + 1), SHMQ_BATCH_HEADER_SIZE, end, count ? (int32_t)count : 1,
                                    shmq_wall_ms());
            /* A padding header carries the relative offset following it. */
            rc = shmq__commit_word(log, &c, INT64_MIN, fh_make((int32_t)c.len, c.rel + count, SHMQ_FRAME_PADDING));
        }
        if (rc != SHMQ_OK)
            return rc; /* padded over by an unblocker: the copier stalled past the timeout */
        end += count;
        pos += flen;
    }
    return end;
}

int32_t shmq_frames_epochs(const uint8_t *buf, int64_t len, int32_t last_epoch, int32_t *epochs, int64_t *starts,
                           int32_t max)
{
    int32_t n = 0;
    if (!buf || len < 0)
        return SHMQ_ERR_ARG;
    for (int64_t pos = 0; pos < len && n < max;) {
        uint64_t h;
        uint32_t count;
        int64_t flen = stream_frame(buf, len, pos, SHMQ_MAX_SEGMENT_BYTES, &h, &count);
        if (flen < 0)
            return (int32_t)flen;
        if (fh_type(h) == SHMQ_FRAME_DATA) {
            const uint8_t *b = buf + pos + SHMQ_FRAME_HEADER_SIZE;
            int32_t e = be32(b + SHMQ_BATCH_OFF_LEADER_EPOCH);
            if (e > last_epoch) {
                epochs[n] = e;
                starts[n] = be64(b);
                n++;
                last_epoch = e;
            }
        }
        pos += flen;
    }
    return n;
}

/* ------------------------------------------------------ truncate / reset */

static int64_t reset_body(shmq_log *log, int64_t offset)
{
    if (offset < 0 || (uint64_t)offset > LEO_MASK)
        return SHMQ_ERR_ARG;
    shmq_ctl_header *h = log->hdr;
    uint64_t s = ld_acq(&h->active_seq), t = s + 1;
    /* Every slot forgets its segment; the one of t is prepared now, the
     * others when the ring reaches them. */
    for (uint64_t u = t; u <= s + log->n; u++) {
        shmq_ctl_slot *slot = slot_of(log, u);
        slot->changed_ns = shmq_now_ns();
        st_rel(&slot->state_seq, ss_make(u, SHMQ_SLOT_EMPTY));
    }
    int rc = shmq__prepare_slot(log, t);
    if (rc != SHMQ_OK)
        return rc;
    shmq_ctl_slot *slot = slot_of(log, t);
    __atomic_store_n(&slot->claim, 0, __ATOMIC_SEQ_CST);
    __atomic_store_n(&slot->base_offset, offset, __ATOMIC_RELAXED);
    st_rel(&slot->seal, 0);
    st_rel(&slot->state_seq, ss_make(t, SHMQ_SLOT_ACTIVE));
    st_rel(&h->active_seq, t);
    __atomic_store_n(&h->high_watermark, offset, __ATOMIC_SEQ_CST);
    __atomic_fetch_add(&h->hw_seq, 1, __ATOMIC_SEQ_CST);
    log->flushed_seq = t;
    log->flushed_pos = 0;
    wake_readers(log);
    return offset;
}

static int64_t truncate_body(shmq_log *log, int64_t offset)
{
    if (offset < 0)
        return SHMQ_ERR_ARG;
    int64_t end = shmq_log_end_offset(log);
    if (end < 0 || offset >= end)
        return end;
    int64_t start = shmq_log_start_offset(log);
    if (start < 0)
        return start;
    if (offset < start)
        return shmq_log_reset(log, offset);
    uint64_t seq;
    int rc = shmq__find_segment(log, offset, &seq);
    if (rc != SHMQ_OK)
        return set_error(log, rc, 0, 0, offset);
    shmq_ctl_header *h = log->hdr;
    uint32_t i = (uint32_t)(seq % log->n);
    shmq_ctl_slot *slot = &log->slots[i];
    int64_t base = __atomic_load_n(&slot->base_offset, __ATOMIC_RELAXED);
    uint64_t c = ld_acq(&slot->claim), seal = ld_acq(&slot->seal);
    uint64_t written = claim_pos(c) < log->cap ? claim_pos(c) : log->cap;
    uint64_t limit = seal && seal_size(seal) < written ? seal_size(seal) : written;
    uint64_t target = (uint64_t)(offset - base);
    /* The largest frame boundary at or below offset. */
    uint64_t pos = 0;
    int64_t rel = 0;
    while (pos < limit) {
        uint64_t fh = ld_acq(frame_word(log, i, pos));
        if (fh_len(fh) <= 0)
            break;
        int64_t len = frame_len_checked(log, fh, pos);
        if (len < 0 || !frame_rel_ok(fh, rel))
            return set_error(log, SHMQ_ERR_CORRUPT, seq, pos, base + rel);
        int64_t next = fh_rel(fh);
        if (fh_type(fh) == SHMQ_FRAME_DATA) {
            int64_t n = frame_records(log, i, pos);
            if (n < 0)
                return set_error(log, SHMQ_ERR_CORRUPT, seq, pos, base + rel);
            next += n;
        }
        if (next > (int64_t)target)
            break;
        rel = next;
        pos += (uint64_t)len;
    }
    /* Later segments leave the ring: their slots are prepared again when
     * the log grows back into them (a slot still holding an older segment
     * than u keeps it). */
    uint64_t s = ld_acq(&h->active_seq);
    for (uint64_t u = seq + 1; u <= s + 1; u++) {
        shmq_ctl_slot *later = slot_of(log, u);
        if (ss_seq(ld_acq(&later->state_seq)) == u) {
            later->changed_ns = shmq_now_ns();
            st_rel(&later->state_seq, ss_make(u, SHMQ_SLOT_EMPTY));
        }
    }
    /* The truncated segment takes appends again from pos. */
    if (written > pos)
        memset(log->seg[i] + pos, 0, written - pos);
    for (uint32_t k = 0; k < log->index_entries; k++) {
        uint64_t e = ld_acq(&log->idx[i][k]);
        if (e && ((e >> 32) - 1) * 8 >= pos)
            st_rel(&log->idx[i][k], 0);
        e = ld_acq(&log->tidx[i][2 * k + 1]);
        if (e && ((e >> 32) - 1) * 8 >= pos) {
            st_rel(&log->tidx[i][2 * k + 1], 0);
            st_rel(&log->tidx[i][2 * k], 0);
        }
    }
    __atomic_store_n(&slot->claim, ((uint64_t)rel << 32) | pos, __ATOMIC_SEQ_CST);
    st_rel(&slot->seal, 0);
    slot->changed_ns = shmq_now_ns();
    st_rel(&h->active_seq, seq);
    int64_t new_end = base + rel;
    if (__atomic_load_n(&h->high_watermark, __ATOMIC_ACQUIRE) > new_end) {
        __atomic_store_n(&h->high_watermark, new_end, __ATOMIC_SEQ_CST);
        __atomic_fetch_add(&h->hw_seq, 1, __ATOMIC_SEQ_CST);
    }
    if (log->flushed_seq > seq || (log->flushed_seq == seq && log->flushed_pos > pos)) {
        log->flushed_seq = seq;
        log->flushed_pos = pos;
    }
    wake_readers(log);
    return new_end;
}

/* ------------------------------------------------------------------ flush */

static int sync_range(void *base, uint64_t lo, uint64_t hi)
{
    size_t pg = (size_t)sysconf(_SC_PAGESIZE);
    uint64_t a = lo / pg * pg, b = page_round(hi);
    if (b <= a)
        return SHMQ_OK;
    return msync((uint8_t *)base + a, b - a, MS_SYNC) == 0 ? SHMQ_OK : SHMQ_ERR_IO;
}

int shmq_log_flush(shmq_log *log)
{
    uint64_t s = ld_acq(&log->hdr->active_seq);
    uint64_t from = log->flushed_seq, fpos = log->flushed_pos, upto = 0;
    if (from > s || s - from >= log->n) {
        from = s >= log->n - 1 ? s - (log->n - 1) : 0;
        fpos = 0;
    }
    for (uint64_t seq = from; seq <= s; seq++) {
        shmq_ctl_slot *slot = slot_of(log, seq);
        uint32_t i = (uint32_t)(seq % log->n);
        if (ld_acq(&slot->state_seq) != ss_make(seq, SHMQ_SLOT_ACTIVE))
            continue;
        uint64_t c = ld_acq(&slot->claim), seal = ld_acq(&slot->seal);
        upto = claim_pos(c) < log->cap ? claim_pos(c) : log->cap;
        if (seal && seal_size(seal) < upto)
            upto = seal_size(seal);
        uint64_t lo = seq == from ? fpos : 0;
        if (sync_range(log->seg[i], lo < upto ? lo : upto, upto) != SHMQ_OK ||
            sync_range(log->idx[i], 0, index_bytes(log->cap, log->interval)) != SHMQ_OK ||
            sync_range(log->tidx[i], 0, tindex_bytes(log->cap, log->interval)) != SHMQ_OK)
            return SHMQ_ERR_IO;
    }
    if (sync_range(log->ctl, 0, log->ctl_len) != SHMQ_OK)
        return SHMQ_ERR_IO;
    log->flushed_seq = s;
    log->flushed_pos = upto;
    return SHMQ_OK;
}

/* ------------------------------------------- public entry points, guarded
 * (log_guard.c: a file shrunk or gone under us is SHMQ_ERR_STORAGE) */

int64_t shmq_log_append_frames(shmq_log *log, const uint8_t *buf, int64_t len)
{
    SHMQ_GUARDED_RETURN(int64_t, log, append_frames_body(log, buf, len), 0);
}

int64_t shmq_log_high_watermark(shmq_log *log)
{
    SHMQ_GUARDED_RETURN(int64_t, log, high_watermark_body(log), 0);
}

int64_t shmq_log_publish_leo(shmq_log *log, uint32_t replica_index, uint32_t epoch, int64_t leo, int caught_up)
{
    SHMQ_GUARDED_RETURN(int64_t, log, publish_leo_body(log, replica_index, epoch, leo, caught_up), 0);
}

int64_t shmq_log_truncate(shmq_log *log, int64_t offset)
{
    SHMQ_GUARDED_RETURN(int64_t, log, truncate_body(log, offset), 0);
}

int64_t shmq_log_reset(shmq_log *log, int64_t offset)
{
    SHMQ_GUARDED_RETURN(int64_t, log, reset_body(log, offset), 0);
}

void shmq_log_set_append_state(shmq_log *log, uint32_t state)
{
    SHMQ_GUARDED_VOID(log, set_append_state_body(log, state));
}

void shmq_log_set_replication(shmq_log *log, uint32_t replicated, uint32_t leader_epoch, uint32_t leader_index,
                              uint32_t isr_mask, int64_t epoch_start_offset)
{
    SHMQ_GUARDED_VOID(log, set_replication_body(log, replicated, leader_epoch, leader_index, isr_mask, epoch_start_offset));
}

int64_t shmq_log_advance_hw(shmq_log *log, int64_t hw)
{
    SHMQ_GUARDED_RETURN(int64_t, log, advance_hw_body(log, hw), 0);
}

int64_t shmq_log_recompute_hw(shmq_log *log)
{
    SHMQ_GUARDED_RETURN(int64_t, log, recompute_hw_body(log), 0);
}

void shmq_log_mark_deleted(shmq_log *log)
{
    SHMQ_GUARDED_VOID(log, mark_deleted_body(log));
}
