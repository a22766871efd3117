/*
 * Partition log files: create the control block and every segment and
 * index file up front, open and map them, close, the handle's accessors, and
 * the fault-injection configuration of tests.
 *
 * Invariants relied on:
 *  - Every file is created at its final size with all blocks allocated
 *    (posix_fallocate), so a full tmpfs is an error at create and never a
 *    SIGBUS in the middle of a write; sizes never change afterwards.
 *  - The creator fills the control block while nobody can use it: the magic
 *    is stored last, with release, so an opener that reads it sees a
 *    complete header. Openers check magic, version and every size against
 *    the files (same owner, regular files, exact lengths) before mapping.
 *  - A failed create removes only what it made: the directory may hold
 *    another log's files.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "log_internal.h"

/* --------------------------------------------------------- create / open */

static void file_name(char *out, size_t n, const char *dir, uint32_t slot, const char *ext)
{
    if (ext)
        snprintf(out, n, "%s/%u.%s", dir, slot, ext);
    else
        snprintf(out, n, "%s/partition.ctl", dir);
}


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
    h->slowest_offset = INT64_MAX; /* no consumer group holds anything yet */
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

static void *map_file(const char *path, size_t expect, int *rc, uint64_t *ino)
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
    *ino = (uint64_t)st.st_ino;
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
        { "stop_after_add:", FAULT_STOP_AFTER_ADD },
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
    log->fault_file = -2;
    log->dirfd = open(dir, O_PATH | O_DIRECTORY | O_CLOEXEC);
    log->ino = calloc(1 + 3 * (size_t)log->n, sizeof *log->ino);
    if (log->dirfd < 0 || !log->ino) {
        rc = SHMQ_ERR_IO;
        goto fail;
    }
    log->checked_ns = shmq_now_ns();
    shmq__guard_install();
    log->ctl = map_file(path, log->ctl_len, &rc, &log->ino[0]);
    if (!log->ctl)
        goto fail;
    log->hdr = (shmq_ctl_header *)log->ctl;
    log->slots = (shmq_ctl_slot *)(log->ctl + SHMQ_CTL_HEADER_SIZE);
    log->readers = (shmq_reader_slot *)(log->ctl + SHMQ_CTL_HEADER_SIZE + (size_t)log->n * SHMQ_CTL_SLOT_SIZE);
    for (uint32_t i = 0; i < log->n; i++) {
        file_name(path, sizeof path, dir, i, "log");
        if (!(log->seg[i] = map_file(path, log->cap, &rc, &log->ino[1 + 3 * i])))
            goto fail;
        file_name(path, sizeof path, dir, i, "index");
        if (!(log->idx[i] = map_file(path, index_bytes(log->cap, log->interval), &rc, &log->ino[2 + 3 * i])))
            goto fail;
        file_name(path, sizeof path, dir, i, "timeindex");
        if (!(log->tidx[i] = map_file(path, tindex_bytes(log->cap, log->interval), &rc, &log->ino[3 + 3 * i])))
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
    if (log->dirfd > 0)  /* 0 only before open set it (calloc) */
        close(log->dirfd);
    free(log->ino);
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
