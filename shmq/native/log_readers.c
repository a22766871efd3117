/*
 * Reader positions: the per-partition table of live readers that holds
 * producers back (Aeron's subscriber position counters), and the retention
 * floor computed from it.
 *
 * Ownership and ordering of a reader slot (log.h, shmq_reader_slot):
 *  - owner: 0 = free. A reader takes a free slot with one CAS 0 ->
 *    CLAIMING | pid, fills the other words, then stores pid (seq_cst). Only
 *    that reader writes the slot afterwards, until it stores 0 again
 *    (release). Anyone may free a slot whose process is dead, with a CAS of
 *    the exact owner word it saw -> 0.
 *  - position: the next offset the reader needs; stored by the owner alone,
 *    seq_cst, before it loads space_waiters. A producer that found the ring
 *    full increments space_waiters (seq_cst) before it re-reads positions, so
 *    either the producer sees the new position or the reader sees a waiter
 *    and wakes it (Dekker: both sides store, then load, seq_cst).
 *  - start_time: the owner's process start time, so that a pid reused by
 *    another process never keeps a dead reader's slot alive.
 *  - A slot still CLAIMING does not hold anything back: a reader that races
 *    a recycle while it registers sees OFFSET_OUT_OF_RANGE at its seek, as a
 *    reader that came a moment later would. From the moment its CAS to pid
 *    is visible, the position it published is kept.
 *
 * The retention floor of a block-mode log is min(slowest_offset, position of
 * every live tethered reader). slowest_offset is the floor of the consumer
 * groups' committed offsets, set by the coordinator (INT64_MAX: none).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "log_internal.h"

_Static_assert(sizeof(shmq_reader_slot) == SHMQ_READER_SLOT_SIZE, "a reader slot is one cache line");
_Static_assert(sizeof(shmq_ctl_header) == SHMQ_CTL_HEADER_SIZE, "the header is 8 lines");

#define OWNER_CLAIMING (1ULL << 63)

static inline uint32_t owner_pid(uint64_t owner) { return (uint32_t)owner; }

/* This process's pid without a system call per read: read once, refreshed in
 * a forked child by an atfork handler. A child that inherited a reader's
 * cursor then never writes the parent's slot (its pid is not the owner). */
static uint32_t current_pid;
static pthread_once_t pid_once = PTHREAD_ONCE_INIT;

static void refresh_pid(void) { __atomic_store_n(&current_pid, (uint32_t)getpid(), __ATOMIC_RELAXED); }
static void init_pid(void)
{
    refresh_pid();
    pthread_atfork(NULL, NULL, refresh_pid);
}

static inline uint32_t my_pid(void)
{
    pthread_once(&pid_once, init_pid);
    return __atomic_load_n(&current_pid, __ATOMIC_RELAXED);
}

/* Start time of process pid in clock ticks since boot (/proc/<pid>/stat
 * field 22); 0 when it cannot be read (the process is gone), UINT64_MAX for a
 * zombie (dead, not yet reaped by its parent: kill() still finds it). */
static uint64_t process_start_time(uint32_t pid)
{
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%u/stat", pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return 0;
    buf[n] = 0;
    /* The command name may hold spaces and parentheses: fields resume after
     * the last ')'. Field 3 (state) follows it; start time is field 22. */
    char *p = strrchr(buf, ')');
    if (!p || !p[1] || !p[2])
        return 0;
    p++;
    if (p[1] == 'Z' || p[1] == 'X')
        return UINT64_MAX;
    for (int field = 3; field < 22; field++) {
        p = strchr(p + 1, ' ');
        if (!p)
            return 0;
    }
    return strtoull(p + 1, NULL, 10);
}

/* This process's start time, read once per process (a forked child reads
 * its own). */
static uint64_t my_start_time(void)
{
    static uint32_t cached_pid;
    static uint64_t cached;
    uint32_t pid = (uint32_t)getpid();
    if (__atomic_load_n(&cached_pid, __ATOMIC_ACQUIRE) != pid) {
        __atomic_store_n(&cached, process_start_time(pid), __ATOMIC_RELAXED);
        __atomic_store_n(&cached_pid, pid, __ATOMIC_RELEASE);
    }
    return __atomic_load_n(&cached, __ATOMIC_RELAXED);
}

/* Is the process that owns this slot still the one that took it? */
static int owner_alive(const shmq_reader_slot *r, uint64_t owner)
{
    uint32_t pid = owner_pid(owner);
    if (pid_dead(pid))                  /* 0, out of range (scribbled) or gone */
        return 0;
    uint64_t want = __atomic_load_n(&r->start_time, __ATOMIC_ACQUIRE);
    uint64_t have = process_start_time(pid);
    if (have == UINT64_MAX)
        return 0;
    /* 0: /proc unreadable (the process just went away, or no /proc): trust kill() */
    return have == 0 || want == 0 || have == want;
}

static void wake_producers(shmq_log *log)
{
    if (__atomic_load_n(&log->hdr->space_waiters, __ATOMIC_SEQ_CST)) {
        __atomic_fetch_add(&log->hdr->space_seq, 1, __ATOMIC_SEQ_CST);
        shmq_futex_wake(&log->hdr->space_seq, INT_MAX);
    }
}

shmq_reader_slot *shmq_log_reader_slot(shmq_log *log, uint32_t index)
{
    return index < SHMQ_MAX_READERS ? &log->readers[index] : NULL;
}

static int reader_register_body(shmq_log *log, shmq_cursor *cur, int64_t position, uint32_t flags, uint32_t kind,
                             const char *label)
{
    uint32_t pid = my_pid();
    uint64_t start = my_start_time();
    for (int pass = 0; pass < 2; pass++) {
        for (uint32_t i = 0; i < SHMQ_MAX_READERS; i++) {
            shmq_reader_slot *r = &log->readers[i];
            uint64_t expect = 0;
            if (__atomic_load_n(&r->owner, __ATOMIC_RELAXED) != 0 ||
                !__atomic_compare_exchange_n(&r->owner, &expect, OWNER_CLAIMING | pid, 0, __ATOMIC_SEQ_CST,
                                             __ATOMIC_RELAXED))
                continue;
            __atomic_store_n(&r->start_time, start, __ATOMIC_RELAXED);
            __atomic_store_n(&r->position, position, __ATOMIC_RELAXED);
            __atomic_store_n(&r->flags, flags, __ATOMIC_RELAXED);
            __atomic_store_n(&r->kind, kind, __ATOMIC_RELAXED);
            __atomic_store_n(&r->missed, 0, __ATOMIC_RELAXED);
            memset(r->label, 0, sizeof r->label);
            if (label)
                strncpy(r->label, label, sizeof r->label - 1);
            __atomic_store_n(&r->owner, (uint64_t)pid, __ATOMIC_SEQ_CST);
            cur->reader_id = i + 1;
            return (int)i;
        }
        if (shmq_log_readers_sweep(log) == 0)
            break;
    }
    return SHMQ_ERR_READERS_FULL;
}

static void reader_release_body(shmq_log *log, shmq_cursor *cur)
{
    uint32_t id = cur->reader_id;
    cur->reader_id = 0;
    if (id == 0 || id > SHMQ_MAX_READERS)
        return;
    shmq_reader_slot *r = &log->readers[id - 1];
    uint64_t mine = (uint64_t)my_pid();
    /* Only the slot's owner frees it (a forked child holding a copy of the
     * cursor does not). */
    __atomic_compare_exchange_n(&r->owner, &mine, 0, 0, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED);
    wake_producers(log);
}

void shmq__reader_publish(shmq_log *log, const shmq_cursor *cur)
{
    uint32_t id = cur->reader_id;
    if (id == 0 || id > SHMQ_MAX_READERS)
        return;
    shmq_reader_slot *r = &log->readers[id - 1];
    /* The owner's own line: a plain compare first keeps repeated empty reads
     * from writing (and from a fence). */
    if (__atomic_load_n(&r->position, __ATOMIC_RELAXED) == cur->next_offset ||
        __atomic_load_n(&r->owner, __ATOMIC_RELAXED) != my_pid())
        return;
    __atomic_store_n(&r->position, cur->next_offset, __ATOMIC_SEQ_CST);
    wake_producers(log);
}

static int readers_sweep_body(shmq_log *log)
{
    int freed = 0;
    for (uint32_t i = 0; i < SHMQ_MAX_READERS; i++) {
        shmq_reader_slot *r = &log->readers[i];
        uint64_t owner = __atomic_load_n(&r->owner, __ATOMIC_ACQUIRE);
        if (owner == 0 || owner_alive(r, owner))
            continue;
        if (__atomic_compare_exchange_n(&r->owner, &owner, 0, 0, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED))
            freed++;
    }
    if (freed)
        wake_producers(log);
    return freed;
}

static int64_t retention_floor_body(shmq_log *log, int32_t *holder)
{
    int64_t floor = __atomic_load_n(&log->hdr->slowest_offset, __ATOMIC_SEQ_CST);
    int32_t who = floor == INT64_MAX ? -2 : -1;
    for (uint32_t i = 0; i < SHMQ_MAX_READERS; i++) {
        shmq_reader_slot *r = &log->readers[i];
        uint64_t owner = __atomic_load_n(&r->owner, __ATOMIC_SEQ_CST);
        if (owner == 0 || (owner & OWNER_CLAIMING))
            continue;
        if (!(__atomic_load_n(&r->flags, __ATOMIC_RELAXED) & SHMQ_READER_TETHERED))
            continue;
        int64_t pos = __atomic_load_n(&r->position, __ATOMIC_SEQ_CST);
        if (pos < floor) {
            floor = pos;
            who = (int32_t)i;
        }
    }
    if (holder)
        *holder = who;
    return floor;
}

static void set_slowest_body(shmq_log *log, int64_t offset)
{
    __atomic_store_n(&log->hdr->slowest_offset, offset, __ATOMIC_SEQ_CST);
    wake_producers(log);
}

int shmq__wait_for_space(shmq_log *log, int (*still_full)(shmq_log *, uint64_t), uint64_t seq, int64_t deadline)
{
    int64_t slice = 10000000; /* re-check dead readers at least this often */
    if (deadline >= 0) {
        int64_t left = deadline - shmq_now_ns();
        if (left <= 0)
            return SHMQ_ERR_TIMEOUT;
        if (left < slice)
            slice = left;
    }
    int64_t t0 = shmq_now_ns();
    uint32_t v = __atomic_load_n(&log->hdr->space_seq, __ATOMIC_SEQ_CST);
    __atomic_fetch_add(&log->hdr->space_waiters, 1, __ATOMIC_SEQ_CST);
    if (shmq_log_readers_sweep(log) == 0 && still_full(log, seq))
        shmq_futex_wait(&log->hdr->space_seq, v, slice);
    __atomic_fetch_sub(&log->hdr->space_waiters, 1, __ATOMIC_SEQ_CST);
    __atomic_fetch_add(&log->hdr->blocked_ns, (uint64_t)(shmq_now_ns() - t0), __ATOMIC_RELAXED);
    return SHMQ_OK;
}

/* ------------------------------------------- public entry points, guarded
 * (log_guard.c: a file shrunk or gone under us is SHMQ_ERR_STORAGE) */

int shmq_log_reader_register(shmq_log *log, shmq_cursor *cur, int64_t position, uint32_t flags, uint32_t kind,
                             const char *label)
{
    SHMQ_GUARDED_RETURN(int, log, reader_register_body(log, cur, position, flags, kind, label), 0);
}

void shmq_log_reader_release(shmq_log *log, shmq_cursor *cur)
{
    SHMQ_GUARDED_VOID(log, reader_release_body(log, cur));
}

int shmq_log_readers_sweep(shmq_log *log)
{
    SHMQ_GUARDED_RETURN(int, log, readers_sweep_body(log), 0);
}

int64_t shmq_log_retention_floor(shmq_log *log, int32_t *holder)
{
    SHMQ_GUARDED_RETURN(int64_t, log, retention_floor_body(log, holder), 0);
}

void shmq_log_set_slowest(shmq_log *log, int64_t offset)
{
    SHMQ_GUARDED_VOID(log, set_slowest_body(log, offset));
}
