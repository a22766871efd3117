/*
 * Private header of the partition-log C files (log_files.c, log_append.c,
 * log_read.c, log_wait.c, log_unblock.c, log_replica.c): the process-local
 * handle, the packed words of the control block and of frames, and the few
 * helpers and functions that cross files. cffi never reads this header
 * (build.py feeds it the public headers only) and the functions declared
 * here are hidden in the shared object. The byte layout and the frame
 * protocol are described in log.h.
 *
 * Memory-ordering invariants of the shared words (x86 makes most of these
 * free; the code states them in C11 terms so it stays right elsewhere). Each
 * log_*.c file repeats the ones it relies on.
 *  - slot.claim: any producer, one fetch-add (acq_rel) between two acquire
 *    loads of state_seq that must read the same ACTIVE generation, else the
 *    add is void (after a whole ring turn it may belong to a later one). The
 *    activator resets it with an exchange while the slot is ACTIVATING,
 *    before publishing the slot ACTIVE with a release store of state_seq.
 *  - slot.state_seq: changed only by CAS (cleaner, activator), or a release
 *    store by the CAS winner. Writers of segment bytes for a new generation
 *    issue a release fence after changing it and before touching the bytes;
 *    readers copy, issue an acquire fence, and re-read it (seqlock).
 *  - frame header words: CAS only (see log.h); the commit is a release CAS so
 *    a reader that acquires a positive length sees the whole batch.
 *  - slot.seal: one CAS from 0; the value is the truth about where segment
 *    seq ends, whoever wrote it.
 *  - header.active_seq: CAS seq -> seq+1 by whoever activates seq+1.
 *  - header.waiters / commit_seq: waiters increments (seq_cst) and re-checks
 *    the frame before sleeping; a producer reads waiters (seq_cst) after its
 *    commit CAS, so one of the two always sees the other.
 *
 * Ownership: a shmq_log handle belongs to one thread at a time (its error
 * fields, fault counters and flush position are unsynchronised); everything
 * it maps is shared by every process that opened the log.
 */
#ifndef SHMQ_LOG_INTERNAL_H
#define SHMQ_LOG_INTERNAL_H
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <limits.h>
#include <sched.h>
#include <setjmp.h>
#include <signal.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "log.h"
#include "record_batch.h"

/* Functions shared between the log_*.c files: kept out of the shared
 * object's exported symbols (and out of cffi, which reads log.h only). */
#define SHMQ_INTERNAL __attribute__((visibility("hidden")))

#define SEAL_BIT (1ULL << 63)            /* set in every seal word, so a seal is never 0 */
#define REL_MASK 0x3FFFFFFFu             /* relative-offset field of a frame header */
#define POISON 0xFFFFFFFF00000000ULL     /* an unblocker's mark on an unclaimed word of a gap */
#define MAX_FRAME_BYTES (64u << 20)
#define STATE_BITS 8                     /* state_seq = seq << STATE_BITS | state */

/* The process-local handle: the mappings of one log's files and its
 * geometry, read once from the control block at open. */
struct shmq_log {
    uint8_t *ctl;
    size_t ctl_len;
    shmq_ctl_header *hdr;
    shmq_ctl_slot *slots;
    uint32_t n;
    uint64_t cap;
    uint32_t interval;
    uint32_t index_entries;
    uint32_t flags;
    uint64_t unblock_timeout_ns;
    uint8_t *seg[SHMQ_MAX_SLOTS];
    uint64_t *idx[SHMQ_MAX_SLOTS];
    uint64_t *tidx[SHMQ_MAX_SLOTS];
    /* Fault injection (tests only): act after the Nth claim of this process. */
    int fault_kind;
    int64_t fault_after;
    int64_t claims;
    int64_t err_offset, err_seq, err_pos;
    /* shmq_log_flush: what this handle synced last (segment seq, position). */
    uint64_t flushed_seq, flushed_pos;
    /* The reader table, after the slots in the control block (log_readers.c). */
    shmq_reader_slot *readers;
    /* Files under our feet (log_guard.c): the directory, each file's inode
     * as mapped (control block, then 3 per slot), the first file found
     * shrunk or gone (-2 none, -1 partition.ctl, 3 * slot + 0/1/2 for
     * .log/.index/.timeindex), broken once one was, a call counter and
     * when the files were last compared. */
    int dirfd;
    uint64_t *ino;
    int32_t fault_file;
    uint32_t broken;
    uint32_t guard_calls;
    int64_t checked_ns;
    char fault_name[32];
};

enum { FAULT_NONE, FAULT_KILL_AFTER_CLAIM, FAULT_STOP_AFTER_CLAIM, FAULT_KILL_BEFORE_HEADER, FAULT_STOP_AFTER_ADD };

/* ------------------------------------------------------------------ words */

static inline uint64_t ld_acq(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline uint64_t ld_rlx(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
static inline void st_rel(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline int cas64(uint64_t *p, uint64_t expect, uint64_t want)
{
    return __atomic_compare_exchange_n(p, &expect, want, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}

static inline uint64_t ss_make(uint64_t seq, uint32_t state) { return (seq << STATE_BITS) | state; }
static inline uint64_t ss_seq(uint64_t ss) { return ss >> STATE_BITS; }
static inline uint32_t ss_state(uint64_t ss) { return (uint32_t)(ss & 0xFF); }

static inline uint64_t claim_pos(uint64_t c) { return c & 0xFFFFFFFFu; }
static inline uint32_t claim_count(uint64_t c) { return (uint32_t)(c >> 32); }

static inline uint64_t seal_make(uint32_t count, uint64_t size) { return SEAL_BIT | ((uint64_t)count << 32) | size; }
static inline uint64_t seal_size(uint64_t s) { return s & 0xFFFFFFFFu; }
static inline uint32_t seal_count(uint64_t s) { return (uint32_t)((s & ~SEAL_BIT) >> 32); }

static inline uint64_t fh_make(int32_t len, uint32_t rel, uint32_t type)
{
    return (uint64_t)(uint32_t)len | ((uint64_t)(rel & REL_MASK) << 32) | ((uint64_t)type << 62);
}
static inline int32_t fh_len(uint64_t h) { return (int32_t)(uint32_t)h; }
static inline uint32_t fh_rel(uint64_t h) { return (uint32_t)(h >> 32) & REL_MASK; }
static inline uint32_t fh_type(uint64_t h) { return (uint32_t)(h >> 62); }

static inline uint64_t *frame_word(shmq_log *log, uint32_t i, uint64_t pos) { return (uint64_t *)(log->seg[i] + pos); }
static inline shmq_ctl_slot *slot_of(shmq_log *log, uint64_t seq) { return &log->slots[seq % log->n]; }

static inline uint32_t align8(uint64_t v) { return (uint32_t)((v + 7) & ~7ULL); }

static inline int32_t be32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return (int32_t)__builtin_bswap32(v); }
static inline int64_t be64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return (int64_t)__builtin_bswap64(v); }

static inline int set_error(shmq_log *log, int code, uint64_t seq, uint64_t pos, int64_t offset)
{
    log->err_seq = (int64_t)seq;
    log->err_pos = (int64_t)pos;
    log->err_offset = offset;
    return code;
}

static inline void relax(int round)
{
    if (round < 64) {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
    } else if (round < 128) {
        sched_yield();
    } else {
        struct timespec ts = { 0, 20000 };
        nanosleep(&ts, NULL);
    }
}

static inline int pid_dead(uint32_t pid)
{
    /* Above Linux's PID_MAX_LIMIT no process can have it: a scribbled word.
     * (kill() would take it as a negative pid_t, a process group; -1 is
     * "every process", always alive: the lock would never be taken over.) */
    if (pid == 0 || pid > (1u << 22))
        return 1;
    return kill((pid_t)pid, 0) == -1 && errno == ESRCH;
}

static inline void wake_readers(shmq_log *log)
{
    if (__atomic_load_n(&log->hdr->waiters, __ATOMIC_SEQ_CST)) {
        __atomic_fetch_add(&log->hdr->commit_seq, 1, __ATOMIC_SEQ_CST);
        shmq_futex_wake(&log->hdr->commit_seq, INT_MAX);
    }
}

/* ---------------------------------------------------------- file sizes */

static inline size_t page_round(size_t v)
{
    size_t pg = (size_t)sysconf(_SC_PAGESIZE);
    return (v + pg - 1) / pg * pg;
}

static inline size_t index_bytes(uint64_t cap, uint32_t interval) { return page_round((cap / interval + 1) * 8); }
static inline size_t tindex_bytes(uint64_t cap, uint32_t interval) { return page_round((cap / interval + 1) * 16); }

/* ---------------------------------------------------------------- claims */

/* One claimed frame: where it is, what it covers, and its header word. */
typedef struct claim {
    uint32_t index;
    uint64_t pos;
    uint32_t rel;
    uint32_t len;
    uint32_t count;
    int64_t base_offset;
    uint64_t *word;
} claim_t;

/* --------------------------------------------------------------- frames */

/* Validate a complete frame header at pos of segment slot i. Returns the
 * frame length, or SHMQ_ERR_CORRUPT. */
static inline int64_t frame_len_checked(shmq_log *log, uint64_t h, uint64_t pos)
{
    int32_t len = fh_len(h);
    uint32_t type = fh_type(h);
    if (len < SHMQ_MIN_FRAME || len % SHMQ_FRAME_ALIGN || pos + (uint64_t)len > log->cap ||
        (type != SHMQ_FRAME_DATA && type != SHMQ_FRAME_PADDING))
        return SHMQ_ERR_CORRUPT;
    return len;
}

/* Records in the complete data frame at pos (from lastOffsetDelta), read
 * once from shared memory and checked. */
static inline int64_t frame_records(shmq_log *log, uint32_t i, uint64_t pos)
{
    const uint8_t *b = log->seg[i] + pos + SHMQ_FRAME_HEADER_SIZE;
    int32_t lod = be32(b + SHMQ_BATCH_OFF_LAST_OFFSET_DELTA);
    if (lod < 0 || lod >= (int32_t)SHMQ_MAX_RECORDS_PER_SEGMENT)
        return SHMQ_ERR_CORRUPT;
    return (int64_t)lod + 1;
}

/* A data frame starts exactly at the relative offset expected; a padding
 * frame's header carries the relative offset that follows it, which is at
 * least the one expected. */
static inline int frame_rel_ok(uint64_t h, int64_t rel)
{
    return fh_type(h) == SHMQ_FRAME_DATA ? fh_rel(h) == rel : fh_rel(h) >= rel;
}

/* An incomplete frame header at relative offset rel is one of: 0 (claimed,
 * header not written yet), POISON (an unblocker's mark), or a claimed or
 * fenced word of this rel with a length that fits. Anything else is garbage
 * that would otherwise stall readers until an unblocker padded it over. */
static inline int pending_header_ok(shmq_log *log, uint64_t h, uint64_t pos, int64_t rel)
{
    if (h == 0 || h == POISON)
        return 1;
    int64_t len = -(int64_t)fh_len(h);
    return len >= SHMQ_MIN_FRAME && len % SHMQ_FRAME_ALIGN == 0 && pos + (uint64_t)len <= log->cap &&
           fh_rel(h) == rel && fh_type(h) != SHMQ_FRAME_PADDING;
}

/* Checks on live shared memory can fail because the slot was recycled
 * under the walker (its bytes are being zeroed or rewritten): that is not
 * corruption. Re-check the generation before calling anything corrupt. */
static inline int recycled(shmq_ctl_slot *slot, uint64_t ss)
{
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    return ld_rlx(&slot->state_seq) != ss;
}

/* ------------------------------------------------ functions across files */

/* log_append.c: the slot lifecycle and the claim/commit protocol. */
SHMQ_INTERNAL int shmq__prepare_slot(shmq_log *log, uint64_t t);
SHMQ_INTERNAL int shmq__advance(shmq_log *log, uint64_t s);
SHMQ_INTERNAL int shmq__claim_frame(shmq_log *log, uint32_t frame_len, uint32_t count, int64_t deadline, claim_t *c,
                                    int copy);
SHMQ_INTERNAL int shmq__commit_word(shmq_log *log, claim_t *c, int64_t max_ts, uint64_t final);
SHMQ_INTERNAL int shmq__commit_frame(shmq_log *log, claim_t *c, int64_t max_ts);

/* log_read.c: the segment holding an offset. */
SHMQ_INTERNAL int shmq__find_segment(shmq_log *log, int64_t offset, uint64_t *seq_out);

/* log_readers.c: publish cur->next_offset into its reader slot (if any) and
 * wake producers waiting for room; sleep until a full ring may have room
 * (still_full(log, seq) is re-checked after registering as a waiter; one
 * slice of at most 10 ms, so dead readers are noticed). Returns SHMQ_OK, or
 * SHMQ_ERR_TIMEOUT once deadline (>= 0) has passed. */
SHMQ_INTERNAL void shmq__reader_publish(shmq_log *log, const shmq_cursor *cur);
SHMQ_INTERNAL int shmq__wait_for_space(shmq_log *log, int (*still_full)(shmq_log *, uint64_t), uint64_t seq,
                                       int64_t deadline);

/* ------------------------------------------------- guard (log_guard.c)
 *
 * SHMQ_GUARD(log, out, call) evaluates call with a SIGBUS from a mapping of
 * log turned into out = SHMQ_ERR_STORAGE (and the handle marked broken), by
 * pushing a sigjmp_buf on a thread-local chain the SIGBUS handler jumps to.
 * A broken handle fails at once. The body must hold nothing across the
 * call that a jump would leak for good (locks, other handles' state). Public
 * entry points that touch the mappings are thin wrappers around a static
 * body: SHMQ_GUARDED_RETURN(type, log, body(...), idle) (idle: an
 * expression over the result rv_ saying the call found nothing to do) or
 * SHMQ_GUARDED_VOID(log, body(...)).
 */
typedef struct shmq_guard {
    sigjmp_buf env;
    shmq_log *log;
    struct shmq_guard *prev;
} shmq_guard;

extern __thread shmq_guard *shmq__guard_top __attribute__((tls_model("initial-exec"), visibility("hidden")));
/* The SIGBUS handler is installed by the first guard of each shared object
 * that carries the core (the cffi module and the CPython extension each have
 * their own copy and guard chain; each handler passes what is not its own
 * to the one installed before it). */
extern int shmq__guard_ready SHMQ_INTERNAL;
SHMQ_INTERNAL void shmq__guard_install(void);
SHMQ_INTERNAL void shmq__guard_failed(shmq_log *log);
SHMQ_INTERNAL int shmq__check_files(shmq_log *log);

#define SHMQ_GUARD(log_, out_, call_)                                   \
    do {                                                                \
        shmq_guard g_;                                                  \
        g_.log = (log_);                                                \
        g_.prev = shmq__guard_top;                                      \
        if (__builtin_expect(!__atomic_load_n(&shmq__guard_ready, __ATOMIC_ACQUIRE), 0)) \
            shmq__guard_install();                                      \
        if (__atomic_load_n(&g_.log->broken, __ATOMIC_RELAXED)) {       \
            (out_) = SHMQ_ERR_STORAGE;                                  \
            break;                                                      \
        }                                                               \
        if (sigsetjmp(g_.env, 0) == 0) {                                \
            shmq__guard_top = &g_;                                      \
            (out_) = (call_);                                           \
        } else {                                                        \
            shmq__guard_failed(g_.log);                                 \
            (out_) = SHMQ_ERR_STORAGE;                                  \
        }                                                               \
        shmq__guard_top = g_.prev;                                      \
    } while (0)

#define SHMQ_GUARDED_RETURN(type_, log_, call_, idle_)                  \
    do {                                                                \
        type_ rv_;                                                      \
        SHMQ_GUARD(log_, rv_, call_);                                   \
        return (type_)shmq__after(log_, rv_, idle_);                    \
    } while (0)

#define SHMQ_GUARDED_VOID(log_, call_)                                  \
    do {                                                                \
        int rv_;                                                        \
        SHMQ_GUARD(log_, rv_, ((call_), 0));                            \
        (void)rv_;                                                      \
    } while (0)

/* After a guarded call: compare the files with what was mapped at most once
 * a second, on an idle call (nothing to read) or every 1024th call. Racy
 * counter on purpose (relaxed load + store: a lost increment only delays a
 * check). Returns r, or SHMQ_ERR_STORAGE. */
static inline int64_t shmq__after(shmq_log *log, int64_t r, int idle)
{
    if (r == SHMQ_ERR_STORAGE)
        return r;
    uint32_t c = __atomic_load_n(&log->guard_calls, __ATOMIC_RELAXED) + 1;
    __atomic_store_n(&log->guard_calls, c, __ATOMIC_RELAXED);
    if (!idle && (c & 1023))
        return r;
    int64_t now = shmq_now_ns();
    if (now - __atomic_load_n(&log->checked_ns, __ATOMIC_RELAXED) < 1000000000)
        return r;
    __atomic_store_n(&log->checked_ns, now, __ATOMIC_RELAXED);
    int rc = shmq__check_files(log);
    return rc < 0 ? rc : r;
}

/* Bytes of the control block of a log with n slots: header, slots, reader table. */
static inline size_t ctl_bytes(uint32_t n)
{
    return page_round(SHMQ_CTL_HEADER_SIZE + (size_t)n * SHMQ_CTL_SLOT_SIZE +
                      (size_t)SHMQ_MAX_READERS * SHMQ_READER_SLOT_SIZE);
}

#endif
