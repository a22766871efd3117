/*
 * Waits: is there something for a cursor to read, and spin-then-futex
 * sleeps for new frames and for the high watermark. The futex calls and
 * clocks themselves are in wait.c.
 *
 * Invariants relied on:
 *  - Lost-wakeup freedom: a sleeper reads the futex word (seq_cst),
 *    increments the waiter count (seq_cst), re-checks readiness, and only
 *    then sleeps on the word's old value. A waker changes what readiness
 *    reads, then reads the waiter count (seq_cst) and, when non-zero, bumps
 *    the word and wakes. One of the two always sees the other.
 *  - Readers wait on header.commit_seq / waiters (woken by commits, rolls,
 *    unblocking, truncation and high-watermark moves); acks=all producers
 *    wait on header.hw_seq / hw_waiters (woken by high-watermark moves and
 *    append_state changes).
 *  - Sleeps are sliced (at most 100 ms each), so a missed wake costs
 *    latency, never a hang.
 */
#define _GNU_SOURCE

#include "log_internal.h"

/* Is there something for the cursor to look at (a complete frame, a segment
 * change, a recycled slot)? */
/* use_hw: a consumer (stops at the high watermark); a follower copying
 * frames passes 0 (it waits for commits, not for the high watermark). */
static int cursor_ready_at(shmq_log *log, const shmq_cursor *cur, int use_hw)
{
    shmq_ctl_slot *slot = slot_of(log, cur->seq);
    uint64_t ss = ld_acq(&slot->state_seq);
    if (ss != ss_make(cur->seq, SHMQ_SLOT_ACTIVE))
        return ss_seq(ss) > cur->seq;
    /* Replicated: a reader at the high watermark waits for it to move (the
     * mover wakes readers; seq_cst pairs with the waiters increment). */
    if (use_hw && __atomic_load_n(&log->hdr->replicated, __ATOMIC_RELAXED) &&
        __atomic_load_n(&slot->base_offset, __ATOMIC_RELAXED) + cur->rel >=
            __atomic_load_n(&log->hdr->high_watermark, __ATOMIC_SEQ_CST))
        return 0;
    if (cur->pos + SHMQ_FRAME_HEADER_SIZE <= log->cap &&
        fh_len(ld_acq(frame_word(log, (uint32_t)(cur->seq % log->n), cur->pos))) > 0)
        return 1;
    uint64_t seal = ld_acq(&slot->seal);
    return seal && cur->pos >= seal_size(seal) && ld_acq(&log->hdr->active_seq) > cur->seq;
}

static int cursor_ready(shmq_log *log, const shmq_cursor *cur) { return cursor_ready_at(log, cur, 1); }

static int ready_body(shmq_log *log, const shmq_cursor *cur)
{
    return cursor_ready(log, cur);
}

/* Spin for spin_ns, then sleep on the futex word seq (registered in
 * waiters), until ready(log, arg) is non-zero or timeout_ns passes (< 0: no
 * limit). Returns ready's last answer. The waker changes what ready reads,
 * then bumps seq and wakes if waiters != 0 (seq_cst on both sides). Each
 * sleep lasts at most SLEEP_SLICE_NS, a safety net for a waker that died
 * between its commit and its wake. */
#define SLEEP_SLICE_NS 100000000LL

static int spin_then_sleep_sliced(shmq_log *log, int (*ready)(shmq_log *, const void *), const void *arg,
                                  uint32_t *seq, uint32_t *waiters, int64_t spin_ns, int64_t timeout_ns,
                                  int64_t slice_ns)
{
    int64_t start = shmq_now_ns();
    int rc;
    for (int k = 0;; k++) {
        if ((rc = ready(log, arg)) != 0)
            return rc;
        if ((k & 63) == 0 && shmq_now_ns() - start >= spin_ns)
            break;
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
    }
    for (;;) {
        int64_t left = timeout_ns < 0 ? slice_ns : start + timeout_ns - shmq_now_ns();
        if (left <= 0)
            return ready(log, arg);
        uint32_t v = __atomic_load_n(seq, __ATOMIC_SEQ_CST);
        __atomic_fetch_add(waiters, 1, __ATOMIC_SEQ_CST);
        rc = ready(log, arg);
        if (rc == 0)
            shmq_futex_wait(seq, v, left < slice_ns ? left : slice_ns);
        __atomic_fetch_sub(waiters, 1, __ATOMIC_SEQ_CST);
        if (rc != 0 || (rc = ready(log, arg)) != 0)
            return rc;
    }
}

static int spin_then_sleep(shmq_log *log, int (*ready)(shmq_log *, const void *), const void *arg, uint32_t *seq,
                           uint32_t *waiters, int64_t spin_ns, int64_t timeout_ns)
{
    return spin_then_sleep_sliced(log, ready, arg, seq, waiters, spin_ns, timeout_ns, SLEEP_SLICE_NS);
}

static int cursor_ready_cb(shmq_log *log, const void *cur) { return cursor_ready(log, (const shmq_cursor *)cur); }

static int wait_body(shmq_log *log, const shmq_cursor *cur, int64_t spin_ns, int64_t timeout_ns)
{
    return spin_then_sleep(log, cursor_ready_cb, cur, &log->hdr->commit_seq, &log->hdr->waiters, spin_ns,
                           timeout_ns < 0 ? 0 : timeout_ns);
}

static int frame_ready_cb(shmq_log *log, const void *cur) { return cursor_ready_at(log, (const shmq_cursor *)cur, 0); }

static int wait_frames_body(shmq_log *log, const shmq_cursor *cur, int64_t spin_ns, int64_t timeout_ns)
{
    return spin_then_sleep(log, frame_ready_cb, cur, &log->hdr->commit_seq, &log->hdr->waiters, spin_ns,
                           timeout_ns < 0 ? 0 : timeout_ns);
}

static int sleep_frames_body(shmq_log *log, const shmq_cursor *cur, int64_t timeout_ns)
{
    if (timeout_ns <= 0)
        return frame_ready_cb(log, cur);
    return spin_then_sleep_sliced(log, frame_ready_cb, cur, &log->hdr->commit_seq, &log->hdr->waiters, 0,
                                  timeout_ns, timeout_ns);
}

/* 1: the HW is above *(int64_t *)offset; 0: not yet; <0: the log refuses appends. */
static int hw_reached(shmq_log *log, const void *offset)
{
    uint32_t st = __atomic_load_n(&log->hdr->append_state, __ATOMIC_SEQ_CST);
    if (st == SHMQ_APPEND_NOT_LEADER)
        return SHMQ_ERR_NOT_LEADER;
    if (st == SHMQ_APPEND_DELETED)
        return SHMQ_ERR_DELETED;
    int64_t hw = __atomic_load_n(&log->hdr->replicated, __ATOMIC_ACQUIRE)
                     ? __atomic_load_n(&log->hdr->high_watermark, __ATOMIC_SEQ_CST)
                     : shmq_log_end_offset(log);
    return hw > *(const int64_t *)offset;
}

static int wait_hw_body(shmq_log *log, int64_t offset, int64_t spin_ns, int64_t timeout_ns)
{
    return spin_then_sleep(log, hw_reached, &offset, &log->hdr->hw_seq, &log->hdr->hw_waiters, spin_ns, timeout_ns);
}

/* ------------------------------------------- public entry points, guarded
 * (log_guard.c: a file shrunk or gone under us is SHMQ_ERR_STORAGE) */

int shmq_log_ready(shmq_log *log, const shmq_cursor *cur)
{
    SHMQ_GUARDED_RETURN(int, log, ready_body(log, cur), rv_ == 0);
}

int shmq_log_wait(shmq_log *log, const shmq_cursor *cur, int64_t spin_ns, int64_t timeout_ns)
{
    SHMQ_GUARDED_RETURN(int, log, wait_body(log, cur, spin_ns, timeout_ns), rv_ == 0);
}

int shmq_log_wait_frames(shmq_log *log, const shmq_cursor *cur, int64_t spin_ns, int64_t timeout_ns)
{
    SHMQ_GUARDED_RETURN(int, log, wait_frames_body(log, cur, spin_ns, timeout_ns), rv_ == 0);
}

int shmq_log_wait_hw(shmq_log *log, int64_t offset, int64_t spin_ns, int64_t timeout_ns)
{
    SHMQ_GUARDED_RETURN(int, log, wait_hw_body(log, offset, spin_ns, timeout_ns), rv_ == 0);
}

int shmq_log_sleep_frames(shmq_log *log, const shmq_cursor *cur, int64_t timeout_ns)
{
    SHMQ_GUARDED_RETURN(int, log, sleep_frames_body(log, cur, timeout_ns), rv_ == 0);
}
