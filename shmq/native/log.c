/*
 * Partition log: claim / write / commit appends, sealing and slot rotation,
 * bounds-checked reads with a generation re-check, indexes, dead-claim
 * unblocking. The layout and the frame protocol are described in log.h.
 *
 * Memory-ordering invariants (x86 makes most of these free, the code states
 * them in C11 terms so it stays right elsewhere):
 *  - slot.claim: any producer, one fetch-add (acq_rel). The activator resets
 *    it with an exchange while the slot is ACTIVATING, before publishing the
 *    slot ACTIVE with a release store of state_seq.
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
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "log.h"
#include "record_batch.h"

#define SEAL_BIT (1ULL << 63)
#define REL_MASK 0x3FFFFFFFu
#define POISON 0xFFFFFFFF00000000ULL
#define MAX_FRAME_BYTES (64u << 20)
#define STATE_BITS 8

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
};

enum { FAULT_NONE, FAULT_KILL_AFTER_CLAIM, FAULT_STOP_AFTER_CLAIM, FAULT_KILL_BEFORE_HEADER };

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

static int set_error(shmq_log *log, int code, uint64_t seq, uint64_t pos, int64_t offset)
{
    log->err_seq = (int64_t)seq;
    log->err_pos = (int64_t)pos;
    log->err_offset = offset;
    return code;
}

static void relax(int round)
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

static int pid_dead(uint32_t pid)
{
    if (pid == 0)
        return 1;
    return kill((pid_t)pid, 0) == -1 && errno == ESRCH;
}

static void wake_readers(shmq_log *log)
{
    if (__atomic_load_n(&log->hdr->waiters, __ATOMIC_SEQ_CST)) {
        __atomic_fetch_add(&log->hdr->commit_seq, 1, __ATOMIC_SEQ_CST);
        shmq_futex_wake(&log->hdr->commit_seq, INT_MAX);
    }
}

/* --------------------------------------------------------- create / open */

static void file_name(char *out, size_t n, const char *dir, uint32_t slot, const char *ext)
{
    if (ext)
        snprintf(out, n, "%s/%u.%s", dir, slot, ext);
    else
        snprintf(out, n, "%s/partition.ctl", dir);
}

static size_t page_round(size_t v)
{
    size_t pg = (size_t)sysconf(_SC_PAGESIZE);
    return (v + pg - 1) / pg * pg;
}

static size_t ctl_bytes(uint32_t n) { return page_round(SHMQ_CTL_HEADER_SIZE + (size_t)n * SHMQ_CTL_SLOT_SIZE); }
static size_t index_bytes(uint64_t cap, uint32_t interval) { return page_round((cap / interval + 1) * 8); }
static size_t tindex_bytes(uint64_t cap, uint32_t interval) { return page_round((cap / interval + 1) * 16); }

/* Create one file of exactly len bytes, all blocks allocated now, so that a
 * full tmpfs is an error here and never a SIGBUS in the middle of a write. */
static int create_file(const char *path, size_t len)
{
    int fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd < 0)
        return SHMQ_ERR_IO;
    int rc = posix_fallocate(fd, 0, (off_t)len);
    close(fd);
    if (rc != 0) {
        unlink(path);
        errno = rc;
        return (rc == ENOSPC || rc == EDQUOT) ? SHMQ_ERR_NOSPACE : SHMQ_ERR_IO;
    }
    return SHMQ_OK;
}

/* Remove what a failed create made, and nothing else (the directory may
 * hold an existing log: its files are not ours to delete): every file of
 * slots < full, the first `partial` files of slot `full`, and the control
 * block if `ctl`. */
static void remove_files(const char *dir, uint32_t full, int partial, int ctl)
{
    char path[4096];
    static const char *exts[] = { "log", "index", "timeindex" };
    for (uint32_t i = 0; i <= full; i++)
        for (int e = 0; e < (i < full ? 3 : partial); e++) {
            file_name(path, sizeof path, dir, i, exts[e]);
            unlink(path);
        }
    if (ctl) {
        file_name(path, sizeof path, dir, 0, NULL);
        unlink(path);
    }
}

int shmq_log_create(const char *dir, const shmq_log_config *cfg)
{
    if (!cfg || cfg->slot_count < 2 || cfg->slot_count > SHMQ_MAX_SLOTS ||
        cfg->segment_bytes < SHMQ_MIN_SEGMENT_BYTES || cfg->segment_bytes > SHMQ_MAX_SEGMENT_BYTES ||
        cfg->segment_bytes % SHMQ_FRAME_ALIGN || cfg->index_interval < 64 ||
        cfg->index_interval > cfg->segment_bytes)
        return SHMQ_ERR_ARG;
    char path[4096];
    int rc;
    uint32_t made = 0;
    static const char *exts[] = { "log", "index", "timeindex" };
    for (; made < cfg->slot_count; made++) {
        size_t lens[3] = { cfg->segment_bytes, index_bytes(cfg->segment_bytes, cfg->index_interval),
                           tindex_bytes(cfg->segment_bytes, cfg->index_interval) };
        for (int e = 0; e < 3; e++) {
            file_name(path, sizeof path, dir, made, exts[e]);
            if ((rc = create_file(path, lens[e])) != SHMQ_OK) {
                int saved = errno;
                remove_files(dir, made, e, 0);
                errno = saved;
                return rc;
            }
        }
    }
    file_name(path, sizeof path, dir, 0, NULL);
    size_t clen = ctl_bytes(cfg->slot_count);
    if ((rc = create_file(path, clen)) != SHMQ_OK) {
        int saved = errno;
        remove_files(dir, made, 0, 0);
        errno = saved;
        return rc;
    }
    int fd = open(path, O_RDWR | O_NOFOLLOW | O_CLOEXEC);
    uint8_t *m = fd < 0 ? MAP_FAILED : mmap(NULL, clen, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (fd >= 0)
        close(fd);
    if (m == MAP_FAILED) {
        int saved = errno;
        remove_files(dir, made, 0, 1);
        errno = saved;
        return SHMQ_ERR_IO;
    }
    shmq_ctl_header *h = (shmq_ctl_header *)m;
    shmq_ctl_slot *slots = (shmq_ctl_slot *)(m + SHMQ_CTL_HEADER_SIZE);
    h->version = SHMQ_LOG_VERSION;
    h->slot_count = cfg->slot_count;
    h->segment_bytes = cfg->segment_bytes;
    h->index_interval = cfg->index_interval;
    h->flags = cfg->flags;
    h->unblock_timeout_ns = cfg->unblock_timeout_ns;
    h->created_ns = shmq_now_ns();
    h->active_seq = 0;
    h->slowest_offset = 0;
    for (uint32_t i = 0; i < cfg->slot_count; i++) {
        slots[i].state_seq = ss_make(0, SHMQ_SLOT_EMPTY);
        slots[i].max_timestamp = INT64_MIN;
    }
    /* Segment 0 is active from the start; files are fresh, so already zero. */
    slots[0].state_seq = ss_make(0, SHMQ_SLOT_ACTIVE);
    slots[1].state_seq = ss_make(1, SHMQ_SLOT_CLEAN);
    st_rel(&h->magic, SHMQ_LOG_MAGIC);
    munmap(m, clen);
    return SHMQ_OK;
}

static void *map_file(const char *path, size_t expect, int *rc)
{
    int fd = open(path, O_RDWR | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) {
        *rc = SHMQ_ERR_IO;
        return NULL;
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || st.st_uid != geteuid() || (size_t)st.st_size != expect) {
        close(fd);
        *rc = SHMQ_ERR_BAD_LAYOUT;
        return NULL;
    }
    /* MAP_POPULATE: page-table entries are per process; populating them now
     * keeps minor faults off this process's hot path. */
    void *m = mmap(NULL, expect, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0);
    close(fd);
    if (m == MAP_FAILED) {
        *rc = SHMQ_ERR_IO;
        return NULL;
    }
    return m;
}

static void read_fault_config(shmq_log *log)
{
    const char *f = getenv("SHMQ_FAULT_INJECT");
    if (!f)
        return;
    static const struct { const char *name; int kind; } kinds[] = {
        { "kill_after_claim:", FAULT_KILL_AFTER_CLAIM },
        { "stop_after_claim:", FAULT_STOP_AFTER_CLAIM },
        { "kill_before_header:", FAULT_KILL_BEFORE_HEADER },
    };
    for (size_t k = 0; k < sizeof kinds / sizeof kinds[0]; k++) {
        size_t len = strlen(kinds[k].name);
        if (strncmp(f, kinds[k].name, len) == 0) {
            log->fault_kind = kinds[k].kind;
            log->fault_after = strtoll(f + len, NULL, 10);
        }
    }
}

int shmq_log_open(const char *dir, shmq_log **out)
{
    char path[4096];
    int rc = SHMQ_OK;
    *out = NULL;
    file_name(path, sizeof path, dir, 0, NULL);
    int fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0)
        return SHMQ_ERR_IO;
    shmq_ctl_header first;
    ssize_t got = pread(fd, &first, sizeof first, 0);
    close(fd);
    if (got != (ssize_t)sizeof first || first.magic != SHMQ_LOG_MAGIC || first.version != SHMQ_LOG_VERSION ||
        first.slot_count < 2 || first.slot_count > SHMQ_MAX_SLOTS ||
        first.segment_bytes < SHMQ_MIN_SEGMENT_BYTES || first.segment_bytes > SHMQ_MAX_SEGMENT_BYTES ||
        first.segment_bytes % SHMQ_FRAME_ALIGN || first.index_interval < 64 ||
        first.index_interval > first.segment_bytes)
        return SHMQ_ERR_BAD_LAYOUT;
    shmq_log *log = calloc(1, sizeof *log);
    if (!log)
        return SHMQ_ERR_IO;
    log->n = first.slot_count;
    log->cap = first.segment_bytes;
    log->interval = first.index_interval;
    log->index_entries = (uint32_t)(first.segment_bytes / first.index_interval);
    log->flags = first.flags;
    log->unblock_timeout_ns = first.unblock_timeout_ns;
    log->ctl_len = ctl_bytes(log->n);
    log->ctl = map_file(path, log->ctl_len, &rc);
    if (!log->ctl)
        goto fail;
    log->hdr = (shmq_ctl_header *)log->ctl;
    log->slots = (shmq_ctl_slot *)(log->ctl + SHMQ_CTL_HEADER_SIZE);
    for (uint32_t i = 0; i < log->n; i++) {
        file_name(path, sizeof path, dir, i, "log");
        if (!(log->seg[i] = map_file(path, log->cap, &rc)))
            goto fail;
        file_name(path, sizeof path, dir, i, "index");
        if (!(log->idx[i] = map_file(path, index_bytes(log->cap, log->interval), &rc)))
            goto fail;
        file_name(path, sizeof path, dir, i, "timeindex");
        if (!(log->tidx[i] = map_file(path, tindex_bytes(log->cap, log->interval), &rc)))
            goto fail;
    }
    read_fault_config(log);
    *out = log;
    return SHMQ_OK;
fail:
    shmq_log_close(log);
    return rc;
}

void shmq_log_close(shmq_log *log)
{
    if (!log)
        return;
    for (uint32_t i = 0; i < log->n; i++) {
        if (log->seg[i])
            munmap(log->seg[i], log->cap);
        if (log->idx[i])
            munmap(log->idx[i], index_bytes(log->cap, log->interval));
        if (log->tidx[i])
            munmap(log->tidx[i], tindex_bytes(log->cap, log->interval));
    }
    if (log->ctl)
        munmap(log->ctl, log->ctl_len);
    free(log);
}

shmq_ctl_header *shmq_log_header(shmq_log *log) { return log->hdr; }
shmq_ctl_slot *shmq_log_slot(shmq_log *log, uint32_t index) { return index < log->n ? &log->slots[index] : NULL; }
uint8_t *shmq_log_segment(shmq_log *log, uint32_t index) { return index < log->n ? log->seg[index] : NULL; }
uint32_t shmq_log_slot_count(shmq_log *log) { return log->n; }
uint64_t shmq_log_segment_bytes(shmq_log *log) { return log->cap; }
int64_t shmq_log_error_offset(shmq_log *log) { return log->err_offset; }
int64_t shmq_log_error_seq(shmq_log *log) { return log->err_seq; }
int64_t shmq_log_error_position(shmq_log *log) { return log->err_pos; }

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
static int prepare_slot(shmq_log *log, uint64_t t)
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
        if ((log->flags & SHMQ_FLAG_OVERFLOW_BLOCK) &&
            __atomic_load_n(&log->hdr->slowest_offset, __ATOMIC_ACQUIRE) < end)
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
static int advance(shmq_log *log, uint64_t s)
{
    shmq_ctl_slot *slot = slot_of(log, s);
    if (ld_acq(&log->hdr->active_seq) != s)
        return SHMQ_OK;
    if (ld_acq(&slot->state_seq) != ss_make(s, SHMQ_SLOT_ACTIVE))
        return SHMQ_ERR_RETRY;
    int64_t end = segment_end(slot);
    if (end < 0)
        return SHMQ_ERR_RETRY;
    int rc = prepare_slot(log, s + 1);
    if (rc != SHMQ_OK)
        return rc;
    return activate(log, s, end);
}

/* Wait until segment s is no longer the active one, helping it along. */
static int await_next_segment(shmq_log *log, uint64_t s, int64_t deadline)
{
    shmq_unblock_state st = { 0 };
    for (int round = 0;; round++) {
        if (ld_acq(&log->hdr->active_seq) != s)
            return SHMQ_OK;
        int rc = advance(log, s);
        if (rc == SHMQ_OK)
            continue;
        if (rc != SHMQ_ERR_RETRY && rc != SHMQ_ERR_TIMEOUT)
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

typedef struct claim {
    uint32_t index;
    uint64_t pos;
    uint32_t rel;
    uint32_t len;
    uint32_t count;
    int64_t base_offset;
    uint64_t *word;
} claim_t;

static void fault_point(shmq_log *log, int kind)
{
    if (log->fault_kind != kind || log->claims != log->fault_after)
        return;
    if (kind == FAULT_STOP_AFTER_CLAIM)
        raise(SIGSTOP);
    else
        raise(SIGKILL);
}

/* Claim frame_len bytes and count offsets in the active segment, sealing it
 * and moving on when it is full. On success the frame header reads
 * "claimed" and c->base_offset is the first offset of the claim. */
static int claim_frame(shmq_log *log, uint32_t frame_len, uint32_t count, int64_t deadline, claim_t *c, int copy)
{
    const uint64_t add = ((uint64_t)count << 32) | frame_len;
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
        uint64_t old = __atomic_fetch_add(&slot->claim, add, __ATOMIC_ACQ_REL);
        uint64_t ss = ld_acq(&slot->state_seq);
        if (ss_state(ss) != SHMQ_SLOT_ACTIVE)
            continue; /* stale: the slot is being recycled; our add is wiped */
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

int64_t shmq_log_append1(shmq_log *log, const char *key_, int64_t key_len,
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
        int rc = claim_frame(log, (uint32_t)flen, 1, deadline, &c, 0);
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
                           int64_t timestamp)
{
    return shmq_log_append1(log, key, key_len, value, value_len, NULL, 0, timestamp, NULL, -1);
}

int64_t shmq_log_append(shmq_log *log, const shmq_records *r, const shmq_batch_meta *meta, int64_t timeout_ns)
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
        int rc = claim_frame(log, (uint32_t)flen, r->count, deadline, &c, 0);
        if (rc != SHMQ_OK)
            return rc;
        shmq_batch_encode((uint8_t *)(c.word + 1), blen, r, c.base_offset, meta ? meta : &plain);
        stamp_epoch(log, &c);
        if (commit_frame(log, &c, max_ts) == SHMQ_OK)
            return c.base_offset;
    }
}

int64_t shmq_log_append_raw(shmq_log *log, const uint8_t *batch, int64_t len, int64_t timeout_ns)
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
        int rc = claim_frame(log, (uint32_t)flen, (uint32_t)lod + 1, deadline, &c, 0);
        if (rc != SHMQ_OK)
            return rc;
        memcpy(c.word + 1, batch, (size_t)blen);
        shmq_batch_set_base_offset((uint8_t *)(c.word + 1), c.base_offset);
        stamp_epoch(log, &c);
        if (commit_frame(log, &c, max_ts) == SHMQ_OK)
            return c.base_offset;
    }
}

/* --------------------------------------------------------------- frames */

/* Validate a complete frame header at pos of segment slot i. Returns the
 * frame length, or SHMQ_ERR_CORRUPT. */
static int64_t frame_len_checked(shmq_log *log, uint64_t h, uint64_t pos)
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
static int64_t frame_records(shmq_log *log, uint32_t i, uint64_t pos)
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

/* ------------------------------------------------------------------ read */

/* Checks on live shared memory can fail because the slot was recycled
 * under the walker (its bytes are being zeroed or rewritten): that is not
 * corruption. Re-check the generation before calling anything corrupt. */
static inline int recycled(shmq_ctl_slot *slot, uint64_t ss)
{
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    return ld_rlx(&slot->state_seq) != ss;
}

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

int64_t shmq_log_start_offset(shmq_log *log)
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

int64_t shmq_log_end_offset(shmq_log *log)
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
    len = -len;
    return len >= SHMQ_MIN_FRAME && len % SHMQ_FRAME_ALIGN == 0 && pos + (uint64_t)len <= log->cap &&
           fh_rel(h) == rel;
}

/* Find the segment holding offset: returns its seq via *seq_out. */
static int find_segment(shmq_log *log, int64_t offset, uint64_t *seq_out)
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

int shmq_log_seek(shmq_log *log, shmq_cursor *cur, int64_t offset)
{
    if (offset < 0)
        return SHMQ_ERR_ARG;
    for (int round = 0;; round++) {
        int64_t end = shmq_log_end_offset(log);
        if (end < 0)
            return (int)end;
        if (offset > end)
            return set_error(log, SHMQ_ERR_OUT_OF_RANGE, 0, 0, offset);
        uint64_t seq;
        int rc = find_segment(log, offset, &seq);
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
        return SHMQ_OK;
    }
}

/* The cursor's segment seq was recycled. Kafka semantics: out of range only
 * if the offset it wants is gone; if a later segment holds it (the cursor
 * sat at the very end of seq), move there. */
static int reseek_recycled(shmq_log *log, shmq_cursor *cur, uint64_t seq)
{
    shmq_cursor c;
    if (shmq_log_seek(log, &c, cur->next_offset) != SHMQ_OK || c.seq <= seq)
        return set_error(log, SHMQ_ERR_OUT_OF_RANGE, seq, cur->pos, cur->next_offset);
    *cur = c;
    return SHMQ_OK;
}

/* shmq_log_read and, with views == NULL, the raw frame stream of
 * shmq_log_read_frames (then the result is bytes, not records, and the high
 * watermark is ignored). */
int64_t shmq_log_read(shmq_log *log, shmq_cursor *cur, uint8_t *dst, int64_t dst_len,
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
            if (fh_len(h) <= 0)
                break;
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
                if (cur->next_offset <= last) {
                    /* views ran out inside this batch: stay on this frame */
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
            advance(log, seq);
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

int shmq_log_ready(shmq_log *log, const shmq_cursor *cur)
{
    return cursor_ready(log, cur);
}

/* Spin for spin_ns, then sleep on the futex word seq (registered in
 * waiters), until ready(log, arg) is non-zero or timeout_ns passes (< 0: no
 * limit). Returns ready's last answer. The waker changes what ready reads,
 * then bumps seq and wakes if waiters != 0 (seq_cst on both sides). */
static int spin_then_sleep(shmq_log *log, int (*ready)(shmq_log *, const void *), const void *arg, uint32_t *seq,
                           uint32_t *waiters, int64_t spin_ns, int64_t timeout_ns)
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
        int64_t left = timeout_ns < 0 ? 100000000 : start + timeout_ns - shmq_now_ns();
        if (left <= 0)
            return ready(log, arg);
        uint32_t v = __atomic_load_n(seq, __ATOMIC_SEQ_CST);
        __atomic_fetch_add(waiters, 1, __ATOMIC_SEQ_CST);
        rc = ready(log, arg);
        if (rc == 0)
            shmq_futex_wait(seq, v, left < 100000000 ? left : 100000000);
        __atomic_fetch_sub(waiters, 1, __ATOMIC_SEQ_CST);
        if (rc != 0 || (rc = ready(log, arg)) != 0)
            return rc;
    }
}

static int cursor_ready_cb(shmq_log *log, const void *cur) { return cursor_ready(log, (const shmq_cursor *)cur); }

int shmq_log_wait(shmq_log *log, const shmq_cursor *cur, int64_t spin_ns, int64_t timeout_ns)
{
    return spin_then_sleep(log, cursor_ready_cb, cur, &log->hdr->commit_seq, &log->hdr->waiters, spin_ns,
                           timeout_ns < 0 ? 0 : timeout_ns);
}

static int frame_ready_cb(shmq_log *log, const void *cur) { return cursor_ready_at(log, (const shmq_cursor *)cur, 0); }

int shmq_log_wait_frames(shmq_log *log, const shmq_cursor *cur, int64_t spin_ns, int64_t timeout_ns)
{
    return spin_then_sleep(log, frame_ready_cb, cur, &log->hdr->commit_seq, &log->hdr->waiters, spin_ns,
                           timeout_ns < 0 ? 0 : timeout_ns);
}

void shmq_log_mark_deleted(shmq_log *log)
{
    shmq_log_set_append_state(log, SHMQ_APPEND_DELETED);
}

void shmq_log_set_slowest(shmq_log *log, int64_t offset)
{
    __atomic_store_n(&log->hdr->slowest_offset, offset, __ATOMIC_RELEASE);
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

int64_t shmq_log_seek_time(shmq_log *log, shmq_cursor *cur, int64_t ts)
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
                        if (n > 0 && (views = malloc(sizeof *views * (size_t)n))) {
                            int64_t got = shmq_batch_decode(copy + 8, blen, 0, views, n);
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
                            int rc = shmq_log_seek(log, cur, found);
                            return rc < 0 ? rc : found;
                        }
                    }
                }
                pos += (uint64_t)len;
            }
        }
        {
            int64_t end = shmq_log_end_offset(log);
            int rc = end < 0 ? (int)end : shmq_log_seek(log, cur, end);
            return rc < 0 ? rc : end;
        }
    again:
        relax(round);
    }
    return SHMQ_ERR_RETRY;
}

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
        int32_t len = -fh_len(h);
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
        int32_t vl = fh_len(v) < 0 ? -fh_len(v) : fh_len(v);
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
                return advance(log, seq) == SHMQ_OK ? 0 : 0;
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

int64_t shmq_log_housekeep(shmq_log *log, shmq_unblock_state *st)
{
    uint64_t s = ld_acq(&log->hdr->active_seq);
    advance(log, s);
    s = ld_acq(&log->hdr->active_seq);
    int rc = prepare_slot(log, s + 1);
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

int64_t shmq_log_unblock_cursor(shmq_log *log, const shmq_cursor *cur, shmq_unblock_state *st)
{
    return walk_and_unblock(log, cur->seq, cur->pos, cur->rel, st);
}

/* ----------------------------------------------------------- replication */

#define LEO_MASK ((1ULL << 48) - 1)

void shmq_log_set_append_state(shmq_log *log, uint32_t state)
{
    shmq_ctl_header *h = log->hdr;
    __atomic_store_n(&h->append_state, state, __ATOMIC_RELEASE);
    __atomic_fetch_add(&h->commit_seq, 1, __ATOMIC_SEQ_CST);
    __atomic_fetch_add(&h->hw_seq, 1, __ATOMIC_SEQ_CST);
    shmq_futex_wake(&h->commit_seq, INT_MAX);
    shmq_futex_wake(&h->hw_seq, INT_MAX);
}

void shmq_log_set_replication(shmq_log *log, uint32_t replicated, uint32_t leader_epoch, uint32_t leader_index,
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

int64_t shmq_log_recompute_hw(shmq_log *log)
{
    int64_t hw = isr_min_leo(log);
    if (hw < 0)
        return __atomic_load_n(&log->hdr->high_watermark, __ATOMIC_ACQUIRE);
    return hw_max(log, hw);
}

int64_t shmq_log_publish_leo(shmq_log *log, uint32_t replica_index, uint32_t epoch, int64_t leo, int caught_up)
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

int64_t shmq_log_advance_hw(shmq_log *log, int64_t hw)
{
    return hw_max(log, hw);
}

int64_t shmq_log_high_watermark(shmq_log *log)
{
    if (__atomic_load_n(&log->hdr->replicated, __ATOMIC_ACQUIRE))
        return __atomic_load_n(&log->hdr->high_watermark, __ATOMIC_ACQUIRE);
    return shmq_log_end_offset(log);
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

int shmq_log_wait_hw(shmq_log *log, int64_t offset, int64_t spin_ns, int64_t timeout_ns)
{
    return spin_then_sleep(log, hw_reached, &offset, &log->hdr->hw_seq, &log->hdr->hw_waiters, spin_ns, timeout_ns);
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

int64_t shmq_log_append_frames(shmq_log *log, const uint8_t *buf, int64_t len)
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
        int rc = claim_frame(log, (uint32_t)flen, count, shmq_deadline(1000000000LL), &c, 1);
        if (rc != SHMQ_OK)
            return rc;
        if (c.base_offset != end) {
            /* Somebody else appended (the log was not the single writer):
             * void the claim and stop. */
            shmq_batch_encode_empty((uint8_t *)(c.word + 1), SHMQ_BATCH_HEADER_SIZE, c.base_offset,
                                    count ? (int32_t)count : 1, shmq_wall_ms());
            commit_word(log, &c, INT64_MIN, fh_make((int32_t)c.len, c.rel + count, SHMQ_FRAME_PADDING));
            return set_error(log, SHMQ_ERR_DIVERGED, 0, (uint64_t)pos, end);
        }
        if (type == SHMQ_FRAME_DATA) {
            memcpy(c.word + 1, body, (size_t)flen - SHMQ_FRAME_HEADER_SIZE);
            rc = commit_frame(log, &c, be64(body + SHMQ_BATCH_OFF_MAX_TIMESTAMP));
        } else {
            shmq_batch_encode_empty((uint8_t *)(c.word + 1), SHMQ_BATCH_HEADER_SIZE, end, count ? (int32_t)count : 1,
                                    shmq_wall_ms());
            /* A padding header carries the relative offset following it. */
            rc = commit_word(log, &c, INT64_MIN, fh_make((int32_t)c.len, c.rel + count, SHMQ_FRAME_PADDING));
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

int64_t shmq_log_reset(shmq_log *log, int64_t offset)
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
    int rc = prepare_slot(log, t);
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

int64_t shmq_log_truncate(shmq_log *log, int64_t offset)
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
    int rc = find_segment(log, offset, &seq);
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
