/*
 * Reads: log start and end offsets, offset-index lookup, seek by offset
 * and by timestamp, and the bounds-checked read of records or raw frames
 * into a private buffer.
 *
 * Invariants relied on:
 *  - Readers never write shared memory (except shmq__advance, which helps a
 *    sealed segment roll exactly as a producer would).
 *  - Seqlock on slot.state_seq: a reader loads it (acquire), copies, issues
 *    an acquire fence and re-reads it; a different value means the slot was
 *    recycled under the copy, which is then discarded (never decoded, never
 *    called corrupt). Only checks made after that re-check may report
 *    SHMQ_ERR_CORRUPT.
 *  - A frame header acquired with a positive length means the whole frame is
 *    written (its commit was a release CAS); every length is checked against
 *    the segment before it is used, and records are decoded only from the
 *    private copy.
 *  - Indexes are hints in shared memory: an entry is trusted only when the
 *    frame header at its position agrees with it; otherwise the scan starts
 *    at the segment's first frame.
 *  - The seal is read after active_seq: a later active segment implies the
 *    seal of this one is set. The next segment must start at this one's
 *    base + seal count, else the control block is corrupt.
 *  - Replicated logs: consumers stop below header.high_watermark (acquire);
 *    raw frame readers (followers) do not.
 */
#define _GNU_SOURCE
#include <stdlib.h>
#include <string.h>

#include "log_internal.h"

/* ------------------------------------------------------------------ read */

/* Base offset of segment seq if its slot holds it ACTIVE (1), else 0; read
 * under the slot generation so a recycling never mixes two segments. */
static int slot_base(shmq_ctl_slot *slot, uint64_t seq, int64_t *base)
{
    uint64_t ss = ld_acq(&slot->state_seq);
    if (ss != ss_make(seq, SHMQ_SLOT_ACTIVE))
        return 0;
    *base = __atomic_load_n(&slot->base_offset, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    return ld_rlx(&slot->state_seq) == ss;
}

static int64_t start_offset_body(shmq_log *log)
{
    uint64_t s = ld_acq(&log->hdr->active_seq);
    int64_t start = -1;
    /* Oldest generation still ACTIVE in the ring, walking back from s. */
    for (uint64_t k = 0; k < log->n && k <= s; k++) {
        shmq_ctl_slot *slot = slot_of(log, s - k);
        int64_t base;
        int ok = slot_base(slot, s - k, &base);
        if (ok <= 0)
            break;
        /* bases fall strictly going back (no segment is empty) */
        if (base < 0 || (start >= 0 && base >= start))
            return set_error(log, SHMQ_ERR_CORRUPT, s - k, 0, start < 0 ? 0 : start);
        start = base;
    }
    return start < 0 ? 0 : start;
}

static int64_t end_offset_body(shmq_log *log)
{
    for (int round = 0;; round++) {
        uint64_t s = ld_acq(&log->hdr->active_seq);
        shmq_ctl_slot *slot = slot_of(log, s);
        uint64_t ss = ld_acq(&slot->state_seq);
        int64_t base = __atomic_load_n(&slot->base_offset, __ATOMIC_RELAXED);
        uint64_t seal = ld_acq(&slot->seal);
        uint64_t c = ld_acq(&slot->claim);
        if (ss != ss_make(s, SHMQ_SLOT_ACTIVE) || ld_acq(&log->hdr->active_seq) != s) {
            /* A slot is ACTIVE before active_seq names it: this lasts only
             * while the ring turns under us, unless the control block is
             * garbage (then an error, never an endless loop). */
            if (round > 4000)
                return set_error(log, SHMQ_ERR_CORRUPT, s, 0, base < 0 ? 0 : base);
            relax(round);
            continue;
        }
        /* Every record takes more than a byte of its segment: a count
         * above the byte position means the control block is garbage. */
        if (base < 0 || claim_count(c) > claim_pos(c) ||
            (seal && (!(seal & SEAL_BIT) || seal_size(seal) > log->cap || seal_count(seal) > seal_size(seal))))
            return set_error(log, SHMQ_ERR_CORRUPT, s, seal ? seal_size(seal) : claim_pos(c), base < 0 ? 0 : base);
        if (seal)
            return base + seal_count(seal);
        if (claim_pos(c) <= log->cap || round > 1000)
            return base + claim_count(c);
        relax(round);
    }
}

/* Largest offset-index entry of slot i whose relative offset <= rel; sets
 * pos and rel_out. Empty entries (0) are skipped downward. */
static void index_floor(shmq_log *log, uint32_t i, uint32_t rel, uint64_t *pos, uint32_t *rel_out)
{
    int64_t lo = 0, hi = (int64_t)log->index_entries - 1, best = -1;
    uint64_t best_entry = 0;
    while (lo <= hi) {
        int64_t mid = (lo + hi) / 2, k = mid;
        uint64_t e = 0;
        while (k >= lo && (e = ld_acq(&log->idx[i][k])) == 0)
            k--;
        if (k < lo) {
            lo = mid + 1;
            continue;
        }
        if ((uint32_t)e <= rel) {
            best = k;
            best_entry = e;
            lo = mid + 1;
        } else {
            hi = k - 1;
        }
    }
    *pos = 0;
    *rel_out = 0;
    if (best >= 0) {
        uint64_t p = ((best_entry >> 32) - 1) * 8;
        if (p < log->cap) {
            *pos = p;
            *rel_out = (uint32_t)best_entry;
        }
    }
}

/* The indexes are hints written into shared memory: trust an entry (pos,
 * rel) of slot i only if it lands inside the claimed part of the segment on
 * a frame header that agrees with it (complete, or claimed by its writer);
 * callers scan from the segment start otherwise, so a corrupt entry never
 * sends a reader past records or into the middle of a frame. */
static int index_entry_ok(shmq_log *log, uint32_t i, uint64_t pos, uint32_t rel)
{
    uint64_t c = ld_acq(&log->slots[i].claim);
    uint64_t limit = claim_pos(c) < log->cap ? claim_pos(c) : log->cap;
    if (pos % SHMQ_FRAME_ALIGN || pos + SHMQ_MIN_FRAME > limit)
        return 0;
    uint64_t h = ld_acq(frame_word(log, i, pos));
    int32_t len = fh_len(h);
    if (len > 0)
        return frame_len_checked(log, h, pos) > 0 && frame_rel_ok(h, rel);
    if (len == 0 || fh_type(h) == SHMQ_FRAME_PADDING)
        return 0;
    int64_t claimed = -(int64_t)len; /* in 64 bits: a scribbled INT32_MIN has no 32-bit negation */
    return claimed >= SHMQ_MIN_FRAME && claimed % SHMQ_FRAME_ALIGN == 0 && pos + (uint64_t)claimed <= log->cap &&
           fh_rel(h) == rel;
}

/* Find the segment holding offset: returns its seq via *seq_out. */
int shmq__find_segment(shmq_log *log, int64_t offset, uint64_t *seq_out)
{
    uint64_t s = ld_acq(&log->hdr->active_seq);
    int64_t above = INT64_MAX;
    for (uint64_t k = 0; k < log->n && k <= s; k++) {
        uint64_t seq = s - k;
        shmq_ctl_slot *slot = slot_of(log, seq);
        int64_t base;
        if (slot_base(slot, seq, &base) <= 0)
            break;
        if (base < 0 || base >= above)
            return SHMQ_ERR_CORRUPT; /* garbage in the slot table */
        above = base;
        if (offset >= base) {
            *seq_out = seq;
            return SHMQ_OK;
        }
    }
    return SHMQ_ERR_OUT_OF_RANGE;
}

static int seek_body(shmq_log *log, shmq_cursor *cur, int64_t offset)
{
    if (offset < 0)
        return SHMQ_ERR_ARG;
    for (int round = 0;; round++) {
        int64_t end = end_offset_body(log);
        if (end < 0)
            return (int)end;
        if (offset > end)
            return set_error(log, SHMQ_ERR_OUT_OF_RANGE, 0, 0, offset);
        uint64_t seq;
        int rc = shmq__find_segment(log, offset, &seq);
        if (rc != SHMQ_OK)
            return set_error(log, rc, 0, 0, offset);
        shmq_ctl_slot *slot = slot_of(log, seq);
        uint32_t i = (uint32_t)(seq % log->n);
        uint64_t ss = ld_acq(&slot->state_seq);
        int64_t base = __atomic_load_n(&slot->base_offset, __ATOMIC_RELAXED);
        uint64_t target = (uint64_t)(offset - base);
        uint64_t pos;
        uint32_t rel;
        index_floor(log, i, target > REL_MASK ? REL_MASK : (uint32_t)target, &pos, &rel);
        if (pos && !index_entry_ok(log, i, pos, rel))
            pos = 0, rel = 0;
        /* Walk complete frames up to the one holding offset. */
        while (pos < log->cap) {
            uint64_t h = ld_acq(frame_word(log, i, pos));
            if (fh_len(h) <= 0)
                break;
            int64_t len = frame_len_checked(log, h, pos);
            if (len < 0 || !frame_rel_ok(h, rel)) {
                if (recycled(slot, ss))
                    break;
                return set_error(log, SHMQ_ERR_CORRUPT, seq, pos, base + rel);
            }
            int64_t next_rel = fh_rel(h);
            if (fh_type(h) == SHMQ_FRAME_DATA) {
                int64_t n = frame_records(log, i, pos);
                if (n < 0) {
                    if (recycled(slot, ss))
                        break;
                    return set_error(log, SHMQ_ERR_CORRUPT, seq, pos, base + rel);
                }
                next_rel += n;
            }
            if (next_rel > (int64_t)target && fh_type(h) == SHMQ_FRAME_DATA)
                break;
            rel = (uint32_t)next_rel;
            pos += (uint64_t)len;
        }
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if (ld_rlx(&slot->state_seq) != ss)
            continue; /* recycled under us: look again */
        cur->seq = seq;
        cur->pos = pos;
        cur->rel = rel;
        cur->next_offset = offset;
        shmq__reader_publish(log, cur);
        return SHMQ_OK;
    }
}

/* The cursor's segment seq was recycled. Kafka semantics: out of range only
 * if the offset it wants is gone; if a later segment holds it (the cursor
 * sat at the very end of seq), move there. */
static int reseek_recycled(shmq_log *log, shmq_cursor *cur, uint64_t seq)
{
    shmq_cursor c = { 0 };
    if (seek_body(log, &c, cur->next_offset) != SHMQ_OK || c.seq <= seq)
        return set_error(log, SHMQ_ERR_OUT_OF_RANGE, seq, cur->pos, cur->next_offset);
    c.reader_id = cur->reader_id;
    *cur = c;
    return SHMQ_OK;
}

/* shmq_log_read and, with views == NULL, the raw frame stream of
 * shmq_log_read_frames (then the result is bytes, not records, and the high
 * watermark is ignored). */
static int64_t read_frames_at(shmq_log *log, shmq_cursor *cur, uint8_t *dst, int64_t dst_len,
                              shmq_record_view *views, int64_t max_records, int check_crc, int64_t *dst_used)
{
    const int frames = views == NULL;
    int64_t nrec = 0;
    int64_t used = 0;
    int64_t done = 0; /* frames mode: bytes of dst the cursor moved past */
    int64_t hw = INT64_MAX;
    if (dst_used)
        *dst_used = 0;
    if (frames)
        max_records = INT64_MAX;
    else if (__atomic_load_n(&log->hdr->replicated, __ATOMIC_ACQUIRE))
        hw = __atomic_load_n(&log->hdr->high_watermark, __ATOMIC_ACQUIRE);
    /* Stop early: records already decoded are returned (with the bytes they
     * point into), else the error. */
#define READ_RESULT (frames ? done : nrec)
#define READ_STOP(err) do { if (READ_RESULT) { if (dst_used) *dst_used = used; return READ_RESULT; } return (err); } while (0)
    for (int hops = 0; hops < 4 && nrec < max_records; hops++) {
        uint64_t seq = cur->seq;
        uint32_t i = (uint32_t)(seq % log->n);
        shmq_ctl_slot *slot = &log->slots[i];
        uint64_t ss = ld_acq(&slot->state_seq);
        if (ss != ss_make(seq, SHMQ_SLOT_ACTIVE)) {
            /* A newer generation in the slot: our segment was recycled. The
             * same or an older one: our segment is still being prepared. */
            if (ss_seq(ss) > seq) {
                if (READ_RESULT)
                    READ_STOP(0);
                /* The offset the cursor wants may still be held by a later
                 * segment (it sat at the end of the recycled one). */
                int rc = reseek_recycled(log, cur, seq);
                if (rc != SHMQ_OK)
                    return rc;
                continue;
            }
            READ_STOP(0);
        }
        int64_t base = __atomic_load_n(&slot->base_offset, __ATOMIC_RELAXED);
        uint64_t pos = cur->pos;
        int64_t rel = cur->rel;
        int64_t copied_records = 0;
        int64_t start_used = used;
        /* 1. Copy complete frames (lengths checked before every access). */
        while (pos < log->cap && nrec + copied_records < max_records) {
            if (base + rel >= hw)
                break; /* replicated: nothing at or above the high watermark */
            uint64_t h = ld_acq(frame_word(log, i, pos));
            if (fh_len(h) <= 0) {
                if (!pending_header_ok(log, h, pos, rel) && !recycled(slot, ss))
                    READ_STOP(set_error(log, SHMQ_ERR_CORRUPT, seq, pos, base + rel));
                break;
            }
            int64_t len = frame_len_checked(log, h, pos);
            if (len < 0 || !frame_rel_ok(h, rel)) {
                if (recycled(slot, ss))
                    break;
                READ_STOP(set_error(log, SHMQ_ERR_CORRUPT, seq, pos, base + rel));
            }
            if (used + len > dst_len) {
                if (used == 0)
                    return set_error(log, SHMQ_ERR_TOO_LARGE, seq, pos, base + rel);
                break;
            }
            memcpy(dst + used, log->seg[i] + pos, (size_t)len);
            if (fh_type(h) == SHMQ_FRAME_DATA) {
                int32_t lod = be32(dst + used + SHMQ_FRAME_HEADER_SIZE + SHMQ_BATCH_OFF_LAST_OFFSET_DELTA);
                if (lod < 0 || lod >= (int32_t)SHMQ_MAX_RECORDS_PER_SEGMENT) {
                    if (recycled(slot, ss))
                        break;
                    READ_STOP(set_error(log, SHMQ_ERR_CORRUPT, seq, pos, base + fh_rel(h)));
                }
                copied_records += lod + 1;
                rel = fh_rel(h) + (int64_t)lod + 1;
            } else {
                rel = fh_rel(h);
            }
            used += len;
            pos += (uint64_t)len;
        }
        /* 2. Seqlock: the copy is good only if the slot kept its generation. */
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if (ld_rlx(&slot->state_seq) != ss) {
            used = start_used;
            if (READ_RESULT)
                READ_STOP(0);
            int rc = reseek_recycled(log, cur, seq);
            if (rc != SHMQ_OK)
                return rc;
            continue;
        }
        /* 3. Decode the private copy. */
        uint64_t fpos = cur->pos;
        int64_t at = start_used;
        while (at < used) {
            uint64_t h;
            memcpy(&h, dst + at, 8);
            int64_t len = fh_len(h);
            if (fh_type(h) == SHMQ_FRAME_DATA) {
                const uint8_t *b = dst + at + SHMQ_FRAME_HEADER_SIZE;
                int64_t blen = shmq_batch_check(b, len - SHMQ_FRAME_HEADER_SIZE, check_crc);
                if (blen < 0)
                    READ_STOP(set_error(log, (int)blen, seq, fpos, base + fh_rel(h)));
                if (be64(b) != base + fh_rel(h))
                    READ_STOP(set_error(log, SHMQ_ERR_CORRUPT, seq, fpos, base + fh_rel(h)));
                if (frames) {
                    /* The stream carries each frame's offset count, not
                     * segment-relative numbers. */
                    int32_t lod = be32(b + SHMQ_BATCH_OFF_LAST_OFFSET_DELTA);
                    uint64_t nh = fh_make((int32_t)len, (uint32_t)lod + 1, SHMQ_FRAME_DATA);
                    memcpy(dst + at, &nh, 8);
                    if (cur->next_offset < base + fh_rel(h) + lod + 1)
                        cur->next_offset = base + fh_rel(h) + lod + 1;
                    cur->rel = fh_rel(h) + lod + 1;
                    at += len;
                    fpos += (uint64_t)len;
                    cur->pos = fpos;
                    done = at;
                    continue;
                }
                int64_t room = max_records - nrec;
                int64_t got = shmq_batch_decode(b, blen, cur->next_offset, views + nrec, room);
                if (got < 0)
                    READ_STOP(set_error(log, (int)got, seq, fpos, base + fh_rel(h)));
                for (int64_t k = 0; k < got; k++) {
                    shmq_record_view *v = &views[nrec + k];
                    v->key_pos += at + SHMQ_FRAME_HEADER_SIZE;
                    v->value_pos += at + SHMQ_FRAME_HEADER_SIZE;
                    v->headers_pos += at + SHMQ_FRAME_HEADER_SIZE;
                }
                nrec += got;
                int32_t lod = be32(b + SHMQ_BATCH_OFF_LAST_OFFSET_DELTA);
                int64_t last = base + fh_rel(h) + lod;
                if (got > 0)
                    cur->next_offset = views[nrec - 1].offset + 1;
                if (got == room && cur->next_offset <= last) {
                    /* views ran out inside this batch: stay on this frame
                     * (a batch with nothing to decode, a control batch, is
                     * passed like padding) */
                    cur->pos = fpos;
                    cur->rel = fh_rel(h);
                    if (dst_used)
                        *dst_used = used;
                    return nrec;
                }
                if (cur->next_offset < last + 1)
                    cur->next_offset = last + 1;
                cur->rel = fh_rel(h) + lod + 1;
            } else {
                if (frames) {
                    uint64_t nh = fh_make((int32_t)len, (uint32_t)(fh_rel(h) - cur->rel), SHMQ_FRAME_PADDING);
                    memcpy(dst + at, &nh, 8);
                }
                cur->rel = fh_rel(h);
                if (cur->next_offset < base + fh_rel(h))
                    cur->next_offset = base + fh_rel(h);
            }
            at += len;
            fpos += (uint64_t)len;
            cur->pos = fpos;
            done = at;
        }
        /* 4. End of a sealed segment: continue in the next one. */
        uint64_t act = ld_acq(&log->hdr->active_seq); /* before the seal: a later segment implies a seal */
        uint64_t seal = ld_acq(&slot->seal);
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if (ld_rlx(&slot->state_seq) != ss)
            break;
        if ((seal && (!(seal & SEAL_BIT) || seal_size(seal) > log->cap)) || (!seal && act > seq))
            READ_STOP(set_error(log, SHMQ_ERR_CORRUPT, seq, cur->pos, base + cur->rel));
        if (!seal || cur->pos < seal_size(seal))
            break;
        /* The seal must agree with the frames walked up to it, and the
         * next segment must start where this one ends (else the control
         * block is garbage: an error, never skipped or renumbered records). */
        if (cur->pos > seal_size(seal) || !(seal & SEAL_BIT) || cur->rel != (int64_t)seal_count(seal))
            READ_STOP(set_error(log, SHMQ_ERR_CORRUPT, seq, cur->pos, base + cur->rel));
        if (cur->next_offset < base + seal_count(seal))
            cur->next_offset = base + seal_count(seal);
        if (ld_acq(&log->hdr->active_seq) <= seq) {
            shmq__advance(log, seq);
            if (ld_acq(&log->hdr->active_seq) <= seq)
                break;
        }
        {
            shmq_ctl_slot *next = slot_of(log, seq + 1);
            uint64_t nss = ld_acq(&next->state_seq);
            int64_t nbase = __atomic_load_n(&next->base_offset, __ATOMIC_RELAXED);
            __atomic_thread_fence(__ATOMIC_ACQUIRE);
            if (nss == ss_make(seq + 1, SHMQ_SLOT_ACTIVE) && ld_rlx(&next->state_seq) == nss &&
                nbase != base + (int64_t)seal_count(seal))
                READ_STOP(set_error(log, SHMQ_ERR_CORRUPT, seq + 1, 0, base + seal_count(seal)));
        }
        cur->seq = seq + 1;
        cur->pos = 0;
        cur->rel = 0;
    }
    if (dst_used)
        *dst_used = used;
    return READ_RESULT;
#undef READ_STOP
#undef READ_RESULT
}

/* Every read ends by publishing the reader's new position (one compare on
 * the reader's own slot when it did not move). */
static int64_t read_body(shmq_log *log, shmq_cursor *cur, uint8_t *dst, int64_t dst_len,
                      shmq_record_view *views, int64_t max_records, int check_crc, int64_t *dst_used)
{
    int64_t n = read_frames_at(log, cur, dst, dst_len, views, max_records, check_crc, dst_used);
    if (n > 0)
        shmq__reader_publish(log, cur);
    return n;
}

int64_t shmq_log_read_frames(shmq_log *log, shmq_cursor *cur, uint8_t *dst, int64_t dst_len, int check_crc)
{
    return shmq_log_read(log, cur, dst, dst_len, NULL, 0, check_crc, NULL);
}

int shmq_gather_fixed(const uint8_t *buf, int64_t buf_len, const shmq_record_view *views, int64_t n,
                      int field, int64_t width, uint8_t *out)
{
    for (int64_t k = 0; k < n; k++) {
        int64_t pos = field ? views[k].key_pos : views[k].value_pos;
        int64_t len = field ? views[k].key_len : views[k].value_len;
        if (len != width || pos < 0 || pos > buf_len - width)
            return -1;
        memcpy(out + k * width, buf + pos, (size_t)width);
    }
    return 0;
}

/* ---------------------------------------------------------- time seek */

/* Does a time-index entry of slot i name a timestamp above mts? The slot's
 * max timestamp lets seek_time skip a segment; garbage there must not make
 * it skip records, so the hint is used only when the index agrees. */
static int tindex_above(shmq_log *log, uint32_t i, int64_t mts)
{
    for (uint32_t k = 0; k < log->index_entries; k++)
        if (ld_acq(&log->tidx[i][2 * k + 1]) && (int64_t)ld_rlx(&log->tidx[i][2 * k]) > mts)
            return 1;
    return 0;
}

static int64_t seek_time_body(shmq_log *log, shmq_cursor *cur, int64_t ts)
{
    for (int round = 0; round < 1000; round++) {
        uint64_t s = ld_acq(&log->hdr->active_seq);
        uint64_t oldest = s;
        for (uint64_t k = 1; k < log->n && k <= s; k++) {
            if (ld_acq(&slot_of(log, s - k)->state_seq) != ss_make(s - k, SHMQ_SLOT_ACTIVE))
                break;
            oldest = s - k;
        }
        for (uint64_t seq = oldest; seq <= s; seq++) {
            shmq_ctl_slot *slot = slot_of(log, seq);
            uint64_t ss = ld_acq(&slot->state_seq);
            if (ss != ss_make(seq, SHMQ_SLOT_ACTIVE))
                goto again;
            int64_t mts = __atomic_load_n(&slot->max_timestamp, __ATOMIC_RELAXED);
            if (mts < ts && !tindex_above(log, (uint32_t)(seq % log->n), mts))
                continue;
            uint32_t i = (uint32_t)(seq % log->n);
            int64_t base = __atomic_load_n(&slot->base_offset, __ATOMIC_RELAXED);
            /* Start from the last time-index entry below ts (timestamps are
             * expected to be non-decreasing for the index to help; the frame
             * walk below is exact either way from where it starts). */
            uint64_t pos = 0;
            int64_t pos_ts = 0;
            uint32_t pos_rel = 0;
            for (uint32_t k = 0; k < log->index_entries; k++) {
                uint64_t e = ld_acq(&log->tidx[i][2 * k + 1]);
                if (!e)
                    continue;
                int64_t ets = (int64_t)ld_rlx(&log->tidx[i][2 * k]);
                if (ets >= ts)
                    break;
                uint64_t p = ((e >> 32) - 1) * 8;
                if (p < log->cap)
                    pos = p;
                else
                    pos = 0;
                pos_ts = ets;
                pos_rel = (uint32_t)e;
            }
            /* Trust the entry only if the frame there is the one it names,
             * with the max timestamp it recorded (else scan from 0). */
            if (pos && !(index_entry_ok(log, i, pos, pos_rel) &&
                         fh_len(ld_acq(frame_word(log, i, pos))) > 0 &&
                         be64(log->seg[i] + pos + SHMQ_FRAME_HEADER_SIZE + SHMQ_BATCH_OFF_MAX_TIMESTAMP) == pos_ts))
                pos = 0;
            while (pos < log->cap) {
                uint64_t h = ld_acq(frame_word(log, i, pos));
                if (fh_len(h) <= 0)
                    break;
                int64_t len = frame_len_checked(log, h, pos);
                if (len < 0) {
                    if (recycled(slot, ss))
                        goto again;
                    return set_error(log, SHMQ_ERR_CORRUPT, seq, pos, base + fh_rel(h));
                }
                if (fh_type(h) == SHMQ_FRAME_DATA) {
                    const uint8_t *b = log->seg[i] + pos + SHMQ_FRAME_HEADER_SIZE;
                    if (be64(b + SHMQ_BATCH_OFF_MAX_TIMESTAMP) >= ts) {
                        /* Decode a private copy to find the exact record. */
                        uint8_t *copy = malloc((size_t)len);
                        shmq_record_view *views = NULL;
                        if (!copy)
                            return SHMQ_ERR_IO;
                        memcpy(copy, log->seg[i] + pos, (size_t)len);
                        int64_t found = -1;
                        int64_t blen = shmq_batch_check(copy + 8, len - 8, 0);
                        int64_t n = blen > 0 ? frame_records(log, i, pos) : -1;
                        /* Views for the records the private copy holds: its
                         * recordCount, which the check bounds by the batch's
                         * size; never lastOffsetDelta, which may claim 2^30
                         * records (a 64 GiB allocation) in a scribbled frame. */
                        int64_t cnt = blen > 0 ? be32(copy + 8 + SHMQ_BATCH_OFF_RECORD_COUNT) : 0;
                        if (n > 0 && cnt > 0 && (views = malloc(sizeof *views * (size_t)cnt))) {
                            int64_t got = shmq_batch_decode(copy + 8, blen, 0, views, cnt);
                            for (int64_t r = 0; r < got; r++)
                                if (views[r].timestamp >= ts) {
                                    found = views[r].offset;
                                    break;
                                }
                        }
                        free(views);
                        free(copy);
                        if (recycled(slot, ss))
                            goto again; /* the copy may mix generations */
                        if (blen < 0 || n < 0)
                            return set_error(log, SHMQ_ERR_CORRUPT, seq, pos, base + fh_rel(h));
                        if (found >= 0) {
                            int rc = seek_body(log, cur, found);
                            return rc < 0 ? rc : found;
                        }
                    }
                }
                pos += (uint64_t)len;
            }
        }
        {
            int64_t end = end_offset_body(log);
            int rc = end < 0 ? (int)end : seek_body(log, cur, end);
            return rc < 0 ? rc : end;
        }
    again:
        relax(round);
    }
    return SHMQ_ERR_RETRY;
}

/* ------------------------------------------- public entry points, guarded
 * (log_guard.c: a file shrunk or gone under us is SHMQ_ERR_STORAGE) */

int64_t shmq_log_start_offset(shmq_log *log)
{
    SHMQ_GUARDED_RETURN(int64_t, log, start_offset_body(log), 0);
}

int64_t shmq_log_end_offset(shmq_log *log)
{
    SHMQ_GUARDED_RETURN(int64_t, log, end_offset_body(log), 0);
}

int shmq_log_seek(shmq_log *log, shmq_cursor *cur, int64_t offset)
{
    SHMQ_GUARDED_RETURN(int, log, seek_body(log, cur, offset), 0);
}

int64_t shmq_log_read(shmq_log *log, shmq_cursor *cur, uint8_t *dst, int64_t dst_len,
                      shmq_record_view *views, int64_t max_records, int check_crc, int64_t *dst_used)
{
    SHMQ_GUARDED_RETURN(int64_t, log, read_body(log, cur, dst, dst_len, views, max_records, check_crc, dst_used), rv_ == 0);
}

int64_t shmq_log_seek_time(shmq_log *log, shmq_cursor *cur, int64_t ts)
{
    SHMQ_GUARDED_RETURN(int64_t, log, seek_time_body(log, cur, ts), 0);
}
