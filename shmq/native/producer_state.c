/*
 * Idempotent-producer state table (layout and ownership rules in
 * producer_state.h): dedup checks done by the appender itself, under a
 * per-producer-id entry lock, around one shmq_log_append.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "producer_state.h"

#define VALID (1ULL << 63)
#define MAX_PID (1u << 22)          /* Linux PID_MAX_LIMIT */
#define OBSERVE_LOCK_NS 1000000000LL

struct shmq_pstate {
    uint8_t *map;
    size_t len;
    uint32_t n;                      /* private copy: never re-read from the file */
    shmq_pstate_entry *e;
};

static inline uint64_t ld_acq(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline uint64_t ld_rlx(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
static inline void st_rel(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline void st_rlx(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }
static inline int cas_acq(uint64_t *p, uint64_t *expect, uint64_t want)
{
    return __atomic_compare_exchange_n(p, expect, want, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}

static size_t file_bytes(uint32_t n) { return SHMQ_PSTATE_HEADER_SIZE + (size_t)n * SHMQ_PSTATE_ENTRY_SIZE; }

static int state_path(char *out, size_t n, const char *dir)
{
    if (!dir)
        return SHMQ_ERR_ARG;
    int w = snprintf(out, n, "%s/producer.state", dir);
    return (w < 0 || (size_t)w >= n) ? SHMQ_ERR_ARG : SHMQ_OK;
}

static int64_t remaining(int64_t deadline)
{
    if (deadline < 0)
        return -1;
    int64_t left = deadline - shmq_now_ns();
    return left > 0 ? left : 0;
}

/* ------------------------------------------------------------ lifecycle */

int shmq_pstate_create(const char *dir, uint32_t entries)
{
    if (entries == 0)
        entries = SHMQ_PSTATE_DEFAULT_ENTRIES;
    if (entries > SHMQ_PSTATE_MAX_ENTRIES)
        return SHMQ_ERR_ARG;
    char path[4096];
    int rc = state_path(path, sizeof path, dir);
    if (rc != SHMQ_OK)
        return rc;
    size_t len = file_bytes(entries);
    int fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd < 0)
        return SHMQ_ERR_IO;
    int frc = posix_fallocate(fd, 0, (off_t)len);
    uint8_t *m = frc != 0 ? MAP_FAILED : mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    int saved = frc != 0 ? frc : errno;
    close(fd);
    if (m == MAP_FAILED) {
        unlink(path);
        errno = saved;
        return (saved == ENOSPC || saved == EDQUOT) ? SHMQ_ERR_NOSPACE : SHMQ_ERR_IO;
    }
    shmq_pstate_header *h = (shmq_pstate_header *)m;
    h->version = SHMQ_PSTATE_VERSION;
    h->entries = entries;
    h->created_ns = shmq_now_ns();
    st_rel(&h->magic, SHMQ_PSTATE_MAGIC);
    munmap(m, len);
    return SHMQ_OK;
}

int shmq_pstate_open(const char *dir, shmq_pstate **out)
{
    if (!out)
        return SHMQ_ERR_ARG;
    *out = NULL;
    char path[4096];
    int rc = state_path(path, sizeof path, dir);
    if (rc != SHMQ_OK)
        return rc;
    int fd = open(path, O_RDWR | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0)
        return SHMQ_ERR_IO;
    struct stat st;
    shmq_pstate_header h;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || st.st_uid != geteuid() ||
        pread(fd, &h, sizeof h, 0) != (ssize_t)sizeof h) {
        close(fd);
        return SHMQ_ERR_BAD_LAYOUT;
    }
    if (h.magic == 0 && h.version == 0 && h.entries == 0) {
        close(fd);
        return SHMQ_ERR_RETRY;  /* its creator has not written the header yet */
    }
    if (h.magic != SHMQ_PSTATE_MAGIC || h.version != SHMQ_PSTATE_VERSION || h.entries == 0 ||
        h.entries > SHMQ_PSTATE_MAX_ENTRIES || (size_t)st.st_size != file_bytes(h.entries)) {
        close(fd);
        return SHMQ_ERR_BAD_LAYOUT;
    }
    size_t len = file_bytes(h.entries);
    uint8_t *m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0);
    close(fd);
    if (m == MAP_FAILED)
        return SHMQ_ERR_IO;
    shmq_pstate *ps = calloc(1, sizeof *ps);
    if (!ps) {
        munmap(m, len);
        return SHMQ_ERR_IO;
    }
    ps->map = m;
    ps->len = len;
    ps->n = h.entries;
    ps->e = (shmq_pstate_entry *)(m + SHMQ_PSTATE_HEADER_SIZE);
    *out = ps;
    return SHMQ_OK;
}

void shmq_pstate_close(shmq_pstate *ps)
{
    if (!ps)
        return;
    munmap(ps->map, ps->len);
    free(ps);
}

uint32_t shmq_pstate_entries(shmq_pstate *ps) { return ps ? ps->n : 0; }

/* --------------------------------------------------------------- entries */

static uint64_t mix(uint64_t x)
{
    x += 0x9E3779B97F4A7C15ULL;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
    return x ^ (x >> 31);
}

/* Find (and with claim, claim) the entry of producer id; the word holds
 * id + 1 so that id 0 is a valid producer id. Returns 1 found, 0 absent,
 * SHMQ_ERR_NOSPACE when claiming in a full table. */
static int find_entry(shmq_pstate *ps, int64_t id, int claim, shmq_pstate_entry **out)
{
    uint64_t key = (uint64_t)id + 1;
    uint32_t n = ps->n;
    uint32_t start = (uint32_t)(mix(key) % n);
    for (uint32_t i = 0; i < n; i++) {
        shmq_pstate_entry *e = &ps->e[(start + i) % n];
        uint64_t cur = ld_acq(&e->producer_id);
        if (cur == 0) {
            if (!claim)
                return 0;
            if (cas_acq(&e->producer_id, &cur, key) || cur == key) {
                *out = e;
                return 1;
            }
        }
        if (cur == key) {
            *out = e;
            return 1;
        }
    }
    return claim ? SHMQ_ERR_NOSPACE : 0;
}

static void relax(int round)
{
    if (round < 16)
        return;
    if (round < 64) {
        sched_yield();
        return;
    }
    struct timespec ts = { 0, 50000 };
    nanosleep(&ts, NULL);
}

/* A lock word naming no live process: a dead pid or garbage. kill() is only
 * given a pid in 1..PID_MAX_LIMIT, never 0 or a negative (process group). */
static int holder_dead(uint64_t holder)
{
    if (holder == 0 || holder > MAX_PID)
        return 1;
    return kill((pid_t)holder, 0) != 0 && errno == ESRCH;
}

/* The wall clock a scheduler tick late at most (the vDSO page alone): what
 * updated_ms needs (it is shown, never compared), without the time-stamp
 * counter on every append. */
static int64_t wall_ms_coarse(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME_COARSE, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* This process's pid for lock words, cached (getpid() is a system call on
 * every one): cleared in the child of a fork (pthread_atfork; only the
 * forking thread lives on there, and it is inside fork(), not here). */
static pid_t cached_pid;
static pthread_once_t pid_once = PTHREAD_ONCE_INIT;
static void forget_pid(void) { __atomic_store_n(&cached_pid, 0, __ATOMIC_RELAXED); }
static void watch_forks(void) { pthread_atfork(NULL, NULL, forget_pid); }

static uint64_t my_pid(void)
{
    pid_t p = __atomic_load_n(&cached_pid, __ATOMIC_RELAXED);
    if (p == 0) {
        pthread_once(&pid_once, watch_forks);
        p = getpid();
        __atomic_store_n(&cached_pid, p, __ATOMIC_RELAXED);
    }
    return (uint64_t)p;
}

static void write_fields(shmq_pstate_entry *e, uint64_t epoch_seq, int32_t first, uint32_t count, int64_t offset)
{
    uint64_t s = ld_rlx(&e->seqlock) | 1;
    st_rlx(&e->seqlock, s);
    __atomic_thread_fence(__ATOMIC_RELEASE);
    __atomic_store_n(&e->first_sequence, first, __ATOMIC_RELAXED);
    __atomic_store_n(&e->last_count, count, __ATOMIC_RELAXED);
    __atomic_store_n(&e->last_base_offset, offset, __ATOMIC_RELAXED);
    __atomic_store_n(&e->updated_ms, wall_ms_coarse(), __ATOMIC_RELAXED);
    st_rlx(&e->epoch_seq, epoch_seq);
    st_rel(&e->seqlock, s + 1);
}

int shmq_pid_lock(uint64_t *word, int64_t deadline, int *took_over)
{
    uint64_t me = my_pid();
    *took_over = 0;
    for (int round = 0;; round++) {
        uint64_t cur = 0;
        if (cas_acq(word, &cur, me))
            return SHMQ_OK;
        if ((round % 64) == 8 && holder_dead(cur) && cas_acq(word, &cur, me)) {
            *took_over = 1;
            return SHMQ_OK;
        }
        if (deadline >= 0 && round > 16 && shmq_now_ns() > deadline)
            return SHMQ_ERR_TIMEOUT;
        relax(round);
    }
}

void shmq_pid_unlock(uint64_t *word) { st_rel(word, 0); }

/* Take the entry lock, taking over from a dead holder. */
static int lock_entry(shmq_pstate_entry *e, int64_t deadline)
{
    int took_over;
    int rc = shmq_pid_lock(&e->lock, deadline, &took_over);
    if (rc == SHMQ_OK && took_over && (ld_rlx(&e->seqlock) & 1))
        write_fields(e, ld_rlx(&e->epoch_seq), -1, 0, -1);   /* died writing: its last batch is unknown */
    return rc;
}

static void unlock_entry(shmq_pstate_entry *e) { shmq_pid_unlock(&e->lock); }

/* Find or claim the entry of producer id and take its lock. */
static int lock_producer(shmq_pstate *ps, int64_t id, int64_t deadline, shmq_pstate_entry **e)
{
    int rc = find_entry(ps, id, 1, e);
    return rc < 0 ? rc : lock_entry(*e, deadline);
}

static uint64_t pack(int16_t epoch, int32_t last_seq)
{
    return VALID | ((uint64_t)(uint16_t)epoch << 32) | (uint32_t)last_seq;
}

/* Kafka's DefaultRecordBatch.incrementSequence: wraps past INT32_MAX to 0. */
static int32_t seq_add(int32_t seq, int32_t inc)
{
    if (seq > INT32_MAX - inc)
        return inc - (INT32_MAX - seq) - 1;
    return seq + inc;
}

/* Decode epoch_seq; SHMQ_ERR_CORRUPT when the bits are no valid state. */
static int unpack(uint64_t es, int16_t *epoch, int32_t *last)
{
    uint32_t ep = (uint32_t)(es >> 32) & 0x7FFFFFFFu;
    int32_t l = (int32_t)(uint32_t)es;
    if (ep > INT16_MAX || l < -1)
        return SHMQ_ERR_CORRUPT;
    *epoch = (int16_t)ep;
    *last = l;
    return SHMQ_OK;
}

/* ---------------------------------------------------------------- append */

/* The epoch and last sequence of an entry whose lock the caller holds:
 * 1 known, 0 no state yet, SHMQ_ERR_CORRUPT for bits that are no state. */
static int held_state(shmq_pstate_entry *e, int16_t *epoch, int32_t *last)
{
    uint64_t es = ld_rlx(&e->epoch_seq);
    if (!(es & VALID))
        return 0;
    return unpack(es, epoch, last) == SHMQ_OK ? 1 : SHMQ_ERR_CORRUPT;
}

/* The checks, under the lock. Returns 1 to append, 0 for a retry of the last
 * batch (*dup_offset set), or an error. */
static int check_sequence(shmq_pstate_entry *e, int16_t epoch, int32_t base_seq, uint32_t count,
                          int64_t *dup_offset)
{
    uint64_t es = ld_rlx(&e->epoch_seq);
    if (!(es & VALID))
        return 1;  /* unknown producer: any sequence */
    int16_t cur_epoch;
    int32_t last;
    if (unpack(es, &cur_epoch, &last) != SHMQ_OK)
        return SHMQ_ERR_CORRUPT;
    if (cur_epoch > epoch)
        return SHMQ_ERR_PRODUCER_FENCED;
    if (cur_epoch < epoch)
        return base_seq == 0 ? 1 : SHMQ_ERR_OUT_OF_ORDER_SEQ;
    int32_t first = __atomic_load_n(&e->first_sequence, __ATOMIC_RELAXED);
    uint32_t last_count = __atomic_load_n(&e->last_count, __ATOMIC_RELAXED);
    if (last_count > 0 && first == base_seq && last_count == count) {
        int64_t off = __atomic_load_n(&e->last_base_offset, __ATOMIC_RELAXED);
        if (off < 0)
            return SHMQ_ERR_CORRUPT;
        *dup_offset = off;
        return 0;
    }
    if (base_seq == seq_add(last, 1))  /* in sequence (INT32_MAX -> 0 included) */
        return 1;
    return base_seq <= last ? SHMQ_ERR_DUPLICATE_SEQ : SHMQ_ERR_OUT_OF_ORDER_SEQ;
}

/* Stores the batch of one locked append; returns its base offset or an error. */
typedef int64_t (*pstate_store_fn)(shmq_log *log, const void *batch, int64_t len, int64_t producer_id, int16_t epoch,
                                   int32_t base_seq, int64_t timeout_ns);

/* The idempotent append shared by every form of batch: lock the producer's
 * entry, check the sequence, store the batch with `store`, update the entry. */
static int64_t append_checked(shmq_pstate *ps, shmq_log *log, const void *batch, int64_t len, uint32_t count,
                              int64_t producer_id, int16_t epoch, int32_t base_seq, int64_t timeout_ns,
                              int *duplicate_out, pstate_store_fn store)
{
    if (duplicate_out)
        *duplicate_out = 0;
    if (!ps || !log || !batch || count == 0 || count > (uint32_t)INT32_MAX || producer_id < 0 ||
        epoch < 0 || (base_seq < 0 && base_seq != SHMQ_SEQ_NEXT))
        return SHMQ_ERR_ARG;
    int64_t deadline = timeout_ns == 0 ? 0 : shmq_deadline(timeout_ns);   /* 0: passed already, no clock */
    shmq_pstate_entry *e;
    int rc = lock_producer(ps, producer_id, deadline, &e);
    if (rc != SHMQ_OK)
        return rc;
    if (base_seq == SHMQ_SEQ_NEXT) {
        int16_t cur_epoch;
        int32_t last;
        base_seq = held_state(e, &cur_epoch, &last) == 1 && cur_epoch == epoch ? seq_add(last, 1) : 0;
    }
    int64_t off = 0;
    rc = check_sequence(e, epoch, base_seq, count, &off);
    if (rc == 1) {
        off = store(log, batch, len, producer_id, epoch, base_seq, timeout_ns == 0 ? 0 : remaining(deadline));
        if (off >= 0)
            write_fields(e, pack(epoch, seq_add(base_seq, (int32_t)(count - 1))), base_seq, count, off);
    } else if (rc == 0) {
        if (duplicate_out)
            *duplicate_out = 1;
    } else {
        off = rc;
    }
    unlock_entry(e);
    return off;
}

static int64_t store_records(shmq_log *log, const void *batch, int64_t len, int64_t producer_id, int16_t epoch,
                             int32_t base_seq, int64_t timeout_ns)
{
    shmq_batch_meta meta = { producer_id, epoch, base_seq, 0, -1 };
    return shmq_log_append(log, (const shmq_records *)batch, &meta, timeout_ns);
}

/* store_records for a transactional producer: the batch carries isTransactional. */
static int64_t store_records_txn(shmq_log *log, const void *batch, int64_t len, int64_t producer_id, int16_t epoch,
                                 int32_t base_seq, int64_t timeout_ns)
{
    shmq_batch_meta meta = { producer_id, epoch, base_seq, SHMQ_BATCH_ATTR_TRANSACTIONAL, -1 };
    return shmq_log_append(log, (const shmq_records *)batch, &meta, timeout_ns);
}

int64_t shmq_pstate_append(shmq_pstate *ps, shmq_log *log, const shmq_records *r, int64_t producer_id,
                           int16_t epoch, int32_t base_seq, int64_t timeout_ns, int *duplicate_out)
{
    return shmq_pstate_append_attr(ps, log, r, producer_id, epoch, base_seq, 0, timeout_ns, duplicate_out);
}

int64_t shmq_pstate_append_attr(shmq_pstate *ps, shmq_log *log, const shmq_records *r, int64_t producer_id,
                                int16_t epoch, int32_t base_seq, int16_t attributes, int64_t timeout_ns,
                                int *duplicate_out)
{
    if (attributes != 0 && attributes != SHMQ_BATCH_ATTR_TRANSACTIONAL) {
        if (duplicate_out)
            *duplicate_out = 0;
        return SHMQ_ERR_ARG;
    }
    return append_checked(ps, log, r, 0, r ? r->count : 0, producer_id, epoch, base_seq, timeout_ns,
                          duplicate_out, attributes ? store_records_txn : store_records);
}

int64_t shmq_pstate_append1(shmq_pstate *ps, shmq_log *log, const char *key, int64_t key_len, const char *value,
                            int64_t value_len, const char *headers, int64_t headers_len, int64_t timestamp,
                            int64_t producer_id, int16_t epoch, int32_t base_seq, int64_t timeout_ns,
                            int *duplicate_out)
{
    return shmq_pstate_append1_attr(ps, log, key, key_len, value, value_len, headers, headers_len, timestamp,
                                    producer_id, epoch, base_seq, 0, timeout_ns, duplicate_out);
}

int64_t shmq_pstate_append1_attr(shmq_pstate *ps, shmq_log *log, const char *key, int64_t key_len,
                                 const char *value, int64_t value_len, const char *headers, int64_t headers_len,
                                 int64_t timestamp, int64_t producer_id, int16_t epoch, int32_t base_seq,
                                 int16_t attributes, int64_t timeout_ns, int *duplicate_out)
{
    if (key_len < -1 || value_len < -1 || headers_len < 0 || timestamp < 0 ||
        (key_len > 0 && !key) || (value_len > 0 && !value) || (headers_len > 0 && !headers))
        return SHMQ_ERR_ARG;
    static const uint8_t null1 = 1, empty = 0;
    int64_t voffs[2] = { 0, value_len < 0 ? 0 : value_len };
    int64_t koffs[2] = { 0, key_len < 0 ? 0 : key_len };
    int64_t hoffs[2] = { 0, headers_len };
    shmq_records r;
    memset(&r, 0, sizeof r);
    r.count = 1;
    r.values = value_len > 0 ? (const uint8_t *)value : &empty;
    r.value_offs = voffs;
    r.value_null = value_len < 0 ? &null1 : NULL;
    r.keys = key_len > 0 ? (const uint8_t *)key : &empty;
    r.key_offs = koffs;
    r.key_null = key_len < 0 ? &null1 : NULL;
    if (headers_len > 0) {
        r.headers = (const uint8_t *)headers;
        r.header_offs = hoffs;
    }
    r.base_timestamp = timestamp;
    return shmq_pstate_append_attr(ps, log, &r, producer_id, epoch, base_seq, attributes, timeout_ns,
                                   duplicate_out);
}

/* Big-endian field of a batch header (the listener's raw batches). */
static int64_t pstate_be(const uint8_t *p, int n)
{
    uint64_t v = 0;   /* unsigned: a producer id of -1 (0xFF..) must not overflow a signed shift */
    for (int i = 0; i < n; i++)
        v = (v << 8) | p[i];
    return (int64_t)v;
}

static int64_t store_raw(shmq_log *log, const void *batch, int64_t len, int64_t producer_id, int16_t epoch,
                         int32_t base_seq, int64_t timeout_ns)
{
    return shmq_log_append_raw(log, (const uint8_t *)batch, len, timeout_ns);
}

int64_t shmq_pstate_append_raw(shmq_pstate *ps, shmq_log *log, const uint8_t *batch, int64_t len,
                               int64_t timeout_ns, int *duplicate_out)
{
    if (duplicate_out)
        *duplicate_out = 0;
    if (!batch || len < SHMQ_BATCH_HEADER_SIZE)
        return SHMQ_ERR_ARG;
    int64_t producer_id = pstate_be(batch + SHMQ_BATCH_OFF_PRODUCER_ID, 8);
    int16_t epoch = (int16_t)pstate_be(batch + SHMQ_BATCH_OFF_PRODUCER_EPOCH, 2);
    int32_t base_seq = (int32_t)(uint32_t)pstate_be(batch + SHMQ_BATCH_OFF_BASE_SEQUENCE, 4);
    int32_t count = (int32_t)(uint32_t)pstate_be(batch + SHMQ_BATCH_OFF_RECORD_COUNT, 4);
    if (count <= 0)
        return SHMQ_ERR_ARG;
    return append_checked(ps, log, batch, len, (uint32_t)count, producer_id, epoch, base_seq, timeout_ns,
                          duplicate_out, store_raw);
}

int64_t shmq_pstate_append_control(shmq_pstate *ps, shmq_log *log, const uint8_t *batch, int64_t len,
                                   int64_t timeout_ns)
{
    if (!ps || !log || !batch || len < SHMQ_BATCH_HEADER_SIZE ||
        !(pstate_be(batch + SHMQ_BATCH_OFF_ATTRIBUTES, 2) & SHMQ_BATCH_ATTR_CONTROL))
        return SHMQ_ERR_ARG;
    int64_t producer_id = pstate_be(batch + SHMQ_BATCH_OFF_PRODUCER_ID, 8);
    int16_t epoch = (int16_t)pstate_be(batch + SHMQ_BATCH_OFF_PRODUCER_EPOCH, 2);
    if (producer_id < 0 || epoch < 0)
        return SHMQ_ERR_ARG;
    int64_t deadline = shmq_deadline(timeout_ns);
    shmq_pstate_entry *e;
    int rc = lock_producer(ps, producer_id, deadline, &e);
    if (rc != SHMQ_OK)
        return rc;
    int16_t cur_epoch;
    int32_t last;
    int64_t off = held_state(e, &cur_epoch, &last);
    if (off == 1 && cur_epoch > epoch)
        off = SHMQ_ERR_PRODUCER_FENCED;
    else if (off >= 0)
        off = shmq_log_append_raw(log, batch, len, remaining(deadline));
    unlock_entry(e);
    return off;
}

int shmq_pstate_fence(shmq_pstate *ps, int64_t producer_id, int16_t epoch, int64_t timeout_ns)
{
    if (!ps || producer_id < 0 || epoch < 0)
        return SHMQ_ERR_ARG;
    shmq_pstate_entry *e;
    int rc = lock_producer(ps, producer_id, shmq_deadline(timeout_ns), &e);
    if (rc != SHMQ_OK)
        return rc;
    uint64_t es = ld_rlx(&e->epoch_seq);
    int16_t cur_epoch = -1;
    int32_t last;
    rc = SHMQ_OK;
    if ((es & VALID) && unpack(es, &cur_epoch, &last) != SHMQ_OK)
        cur_epoch = -1;  /* garbage: the fence rewrites it */
    if (cur_epoch > epoch)
        rc = SHMQ_ERR_PRODUCER_FENCED;
    else if (cur_epoch < epoch)
        write_fields(e, pack(epoch, -1), -1, 0, -1);
    unlock_entry(e);
    return rc;
}

/* ------------------------------------------------------------- observe */

static inline uint64_t le64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}
static inline int64_t be64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return (int64_t)__builtin_bswap64(v); }
static inline int32_t be32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return (int32_t)__builtin_bswap32(v); }
static inline int16_t be16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return (int16_t)__builtin_bswap16(v); }

/* Validate the frame at pos (its CRC too when crc); returns its length and
 * sets *batch (NULL for a frame with nothing to record), or SHMQ_ERR_CORRUPT. */
static int64_t next_frame(const uint8_t *buf, int64_t len, int64_t pos, const uint8_t **batch, int crc)
{
    *batch = NULL;
    if (len - pos < SHMQ_FRAME_HEADER_SIZE)
        return SHMQ_ERR_CORRUPT;
    uint64_t h = le64(buf + pos);
    int32_t flen = (int32_t)(uint32_t)h;
    uint32_t type = (uint32_t)(h >> 62);
    if (flen < SHMQ_MIN_FRAME || flen % SHMQ_FRAME_ALIGN || flen > len - pos)
        return SHMQ_ERR_CORRUPT;
    if (type == SHMQ_FRAME_PADDING || type == SHMQ_FRAME_FENCED)
        return flen;
    if (type != SHMQ_FRAME_DATA)
        return SHMQ_ERR_CORRUPT;
    const uint8_t *b = buf + pos + SHMQ_FRAME_HEADER_SIZE;
    int64_t blen = shmq_batch_check(b, flen - SHMQ_FRAME_HEADER_SIZE, crc);
    if (blen < 0 || ((blen + SHMQ_FRAME_HEADER_SIZE + 7) & ~7LL) != flen)
        return SHMQ_ERR_CORRUPT;
    *batch = b;
    return flen;
}

int shmq_pstate_observe_frames(shmq_pstate *ps, const uint8_t *buf, int64_t len)
{
    if (!ps || len < 0 || (!buf && len > 0))
        return SHMQ_ERR_ARG;
    const uint8_t *b;
    for (int64_t pos = 0; pos < len;) {  /* pass 1: validate everything */
        int64_t flen = next_frame(buf, len, pos, &b, 1);
        if (flen < 0)
            return (int)flen;
        pos += flen;
    }
    for (int64_t pos = 0; pos < len;) {  /* pass 2: record */
        pos += next_frame(buf, len, pos, &b, 0);   /* checked whole in pass 1 */
        if (!b)
            continue;
        int64_t pid = be64(b + SHMQ_BATCH_OFF_PRODUCER_ID);
        int16_t epoch = be16(b + SHMQ_BATCH_OFF_PRODUCER_EPOCH);
        int32_t seq = be32(b + SHMQ_BATCH_OFF_BASE_SEQUENCE);
        int32_t lod = be32(b + SHMQ_BATCH_OFF_LAST_OFFSET_DELTA);  /* >= 0: checked */
        if (pid < 0 || epoch < 0 || seq < 0)
            continue;
        shmq_pstate_entry *e;
        int rc = lock_producer(ps, pid, shmq_deadline(OBSERVE_LOCK_NS), &e);
        if (rc != SHMQ_OK)
            return rc;
        write_fields(e, pack(epoch, seq_add(seq, lod)), seq, (uint32_t)lod + 1, be64(b + SHMQ_BATCH_OFF_BASE_OFFSET));
        unlock_entry(e);
    }
    return SHMQ_OK;
}

void shmq_pstate_clear(shmq_pstate *ps)
{
    if (!ps)
        return;
    memset(ps->e, 0, (size_t)ps->n * sizeof *ps->e);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
}

/* ---------------------------------------------------------------- lookup */

int shmq_pstate_lookup(shmq_pstate *ps, int64_t producer_id, int16_t *epoch, int32_t *first_seq,
                       int32_t *last_seq, int64_t *last_offset)
{
    shmq_pstate_entry *e;
    if (!ps || producer_id < 0 || find_entry(ps, producer_id, 0, &e) != 1)
        return 0;
    uint64_t es;
    int32_t first;
    int64_t off;
    for (int round = 0;; round++) {
        uint64_t s1 = ld_acq(&e->seqlock);
        es = ld_rlx(&e->epoch_seq);
        first = __atomic_load_n(&e->first_sequence, __ATOMIC_RELAXED);
        off = __atomic_load_n(&e->last_base_offset, __ATOMIC_RELAXED);
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if (!(s1 & 1) && ld_rlx(&e->seqlock) == s1)
            break;
        if ((round > 16 && (s1 & 1) && holder_dead(ld_acq(&e->lock))) || round > 2000) {
            /* odd with no live writer (died mid-write, or scribbled), or a writer
             * paused mid-write: report the last batch unknown */
            first = -1;
            off = -1;
            break;
        }
        relax(round);
    }
    int16_t ep;
    int32_t last;
    if (!(es & VALID) || unpack(es, &ep, &last) != SHMQ_OK)
        return 0;
    if (epoch)
        *epoch = ep;
    if (first_seq)
        *first_seq = first;
    if (last_seq)
        *last_seq = last;
    if (last_offset)
        *last_offset = off;
    return 1;
}
