/* Helpers shared by the harnesses: private directories, logs filled with
 * varied records, file mappings, a PRNG. */
#define _GNU_SOURCE
#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "fuzz.h"

#define MAX_DIRS 8
static char dirs[MAX_DIRS][256];
static int ndirs;
static pid_t owner;

void fuzz_remove_dirs(void)
{
    if (getpid() != owner)
        return;
    for (int d = 0; d < ndirs; d++) {
        DIR *dp = opendir(dirs[d]);
        if (dp) {
            struct dirent *e;
            while ((e = readdir(dp)))
                if (strcmp(e->d_name, ".") && strcmp(e->d_name, ".."))
                    unlinkat(dirfd(dp), e->d_name, 0);
            closedir(dp);
        }
        rmdir(dirs[d]);
    }
    ndirs = 0;
}

void fuzz_die(const char *what, int64_t rc)
{
    fprintf(stderr, "fuzz harness setup failed: %s (rc %lld)\n", what, (long long)rc);
    exit(2);
}

const char *fuzz_dir(const char *tag)
{
    if (ndirs == MAX_DIRS)
        fuzz_die("too many directories", ndirs);
    const char *base = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : (getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
    char *d = dirs[ndirs];
    snprintf(d, sizeof dirs[0], "%s/shmq-fuzz-%s-XXXXXX", base, tag);
    if (!mkdtemp(d))
        fuzz_die("mkdtemp", -1);
    if (ndirs++ == 0) {
        owner = getpid();
        atexit(fuzz_remove_dirs);
    }
    return d;
}

shmq_log *fuzz_new_log(const char *dir, uint32_t slots, uint64_t seg, uint32_t interval, uint32_t flags)
{
    shmq_log_config cfg = { .slot_count = slots, .segment_bytes = seg, .index_interval = interval,
                            .flags = flags, .unblock_timeout_ns = 1000000 };
    int rc = shmq_log_create(dir, &cfg);
    if (rc != SHMQ_OK)
        fuzz_die("shmq_log_create", rc);
    shmq_log *log;
    if ((rc = shmq_log_open(dir, &log)) != SHMQ_OK)
        fuzz_die("shmq_log_open", rc);
    return log;
}

uint64_t fuzz_rand(uint64_t *s)
{
    uint64_t z = (*s += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

void fuzz_fill_log(shmq_log *log, shmq_pstate *ps, uint32_t seed, int n)
{
    uint64_t r = seed;
    static const uint8_t hdrs[] = { 2, 4, 'h', '1', 4, 'v', 'v' };   /* one header h1=vv (zig-zag varints) */
    uint8_t key[32], val[200];
    int64_t ts = 1700000000000LL + seed;
    int32_t seqs[3] = { 0, 0, 0 };
    for (int i = 0; i < n; i++) {
        int64_t klen = (int64_t)(fuzz_rand(&r) % 12) - 1, vlen = (int64_t)(fuzz_rand(&r) % sizeof val) - 1;
        memset(key, 'a' + i % 26, sizeof key);
        memset(val, 'A' + i % 26, sizeof val);
        ts += (int64_t)(fuzz_rand(&r) % 50) - 10;            /* sometimes backwards */
        int64_t rc, kind = (int64_t)(fuzz_rand(&r) % 4);
        if (kind == 0) {
            rc = shmq_log_append1(log, klen < 0 ? NULL : (const char *)key, klen, vlen < 0 ? NULL : (const char *)val,
                                  vlen, (i & 1) ? (const char *)hdrs : NULL, (i & 1) ? (int64_t)sizeof hdrs : 0, ts, NULL, 0);
        } else {
            uint32_t count = 1 + (uint32_t)(fuzz_rand(&r) % 5);
            int64_t tss[5];
            for (uint32_t k = 0; k < count; k++)
                tss[k] = ts + (int64_t)k * 3 - 4;
            shmq_records recs = { .count = count, .values = val, .value_width = 17, .keys = key,
                                  .key_width = kind == 2 ? 4 : 0, .base_timestamp = ts, .timestamps = tss };
            if (kind != 2)
                recs.keys = NULL;
            if (kind == 3 && ps) {
                int dup = 0;
                rc = shmq_pstate_append(ps, log, &recs, 1000 + (int64_t)(i % 3), (int16_t)(i % 2), seqs[i % 3], 0,
                                        &dup);
                if (rc >= 0)
                    seqs[i % 3] += (int32_t)count;
                if (rc == SHMQ_ERR_PRODUCER_FENCED || rc == SHMQ_ERR_OUT_OF_ORDER_SEQ ||
                    rc == SHMQ_ERR_DUPLICATE_SEQ)
                    continue;                                 /* epochs alternate on purpose */
            } else {
                shmq_batch_meta meta = { -1, -1, -1, 0, (int32_t)(i / 7) };
                rc = shmq_log_append(log, &recs, &meta, 0);
            }
        }
        if (rc == SHMQ_ERR_TIMEOUT)
            return;                                           /* the ring is full */
        if (rc < 0)
            fuzz_die("append while filling a log", rc);
    }
}

uint8_t *fuzz_map(const char *dir, const char *name, size_t *len)
{
    char path[512];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    int fd = open(path, O_RDWR | O_CLOEXEC);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0)
        fuzz_die(path, -1);
    void *m = mmap(NULL, (size_t)st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (m == MAP_FAILED)
        fuzz_die(path, -1);
    *len = (size_t)st.st_size;
    return m;
}

size_t fuzz_log_frames(shmq_log *log, uint8_t **out)
{
    size_t cap = 1 << 20, len = 0;
    uint8_t *buf = malloc(cap);
    shmq_cursor cur;
    if (shmq_log_seek(log, &cur, shmq_log_start_offset(log)) != SHMQ_OK)
        fuzz_die("seek to the log start", -1);
    for (;;) {
        int64_t n = shmq_log_read_frames(log, &cur, buf + len, (int64_t)(cap - len), 1);
        if (n < 0)
            fuzz_die("shmq_log_read_frames of a valid log", n);
        if (n == 0)
            break;
        len += (size_t)n;
    }
    *out = buf;
    return len;
}

/* Time runs fast in a harness: the core's bounded retry loops (a control
 * block whose words never settle, an entry lock held by a live process)
 * back off with nanosleep and give up after a number of rounds; sleeping
 * would make each such input cost a quarter of a second and starve the
 * fuzzer. This definition takes the place of libc's for the whole binary.
 * Deadline-based waits still wait (busily) as long as they should. */
int nanosleep(const struct timespec *req, struct timespec *rem)
{
    (void)req;
    (void)rem;
    return 0;
}

int sched_yield(void) { return 0; }

/* And clocks run fast: every reading is 1 ms later than the one before, so
 * a deadline (1 s for an entry lock a live process seems to hold) passes
 * after a thousand rounds instead of a second. The driver measures its
 * budget with fuzz_real_ns. */
#ifndef SHMQ_LIBFUZZER   /* libFuzzer measures its own time budget with it */
int clock_gettime(clockid_t id, struct timespec *ts)
{
    static int64_t skew;
    if (syscall(SYS_clock_gettime, id, ts) != 0)
        return -1;
    int64_t ns = (int64_t)ts->tv_nsec + (skew += 1000000);
    ts->tv_sec += ns / 1000000000;
    ts->tv_nsec = ns % 1000000000;
    return 0;
}
#endif

int64_t fuzz_real_ns(void)
{
    struct timespec ts;
    syscall(SYS_clock_gettime, CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* ------------------------------------------------------------ log images */

void fuzz_image_log(fuzz_image *im, const char *tag)
{
    im->dir = fuzz_dir(tag);
    im->writer = fuzz_new_log(im->dir, FUZZ_IMG_SLOTS, FUZZ_IMG_SEG, FUZZ_IMG_INTERVAL, 0);
    if (shmq_pstate_create(im->dir, 16) != SHMQ_OK || shmq_pstate_open(im->dir, &im->pstate) != SHMQ_OK)
        fuzz_die("producer state table", -1);
    im->files[0].map = fuzz_map(im->dir, "partition.ctl", &im->files[0].len);
    im->files[0].used = FUZZ_IMG_CTL;
    static const char *exts[] = { "log", "index", "timeindex" };
    static const size_t used[] = { FUZZ_IMG_SEG, FUZZ_IMG_IDX, FUZZ_IMG_TIDX };
    for (int i = 0; i < FUZZ_IMG_SLOTS; i++)
        for (int e = 0; e < 3; e++) {
            char name[64];
            snprintf(name, sizeof name, "%d.%s", i, exts[e]);
            im->files[1 + 3 * i + e].map = fuzz_map(im->dir, name, &im->files[1 + 3 * i + e].len);
            im->files[1 + 3 * i + e].used = used[e];
        }
}

void fuzz_image_write(fuzz_image *im, const uint8_t *data, size_t size)
{
    for (int f = 0; f < FUZZ_IMG_FILES; f++) {
        size_t n = size < im->files[f].used ? size : im->files[f].used;
        memcpy(im->files[f].map, data, n);
        memset(im->files[f].map + n, 0, im->files[f].len - n);
        data += n;
        size -= n;
    }
}

fuzz_input fuzz_image_read(const fuzz_image *im)
{
    fuzz_input in = { malloc(FUZZ_IMG_BYTES), FUZZ_IMG_BYTES };
    uint8_t *p = in.data;
    for (int f = 0; f < FUZZ_IMG_FILES; f++) {
        memcpy(p, im->files[f].map, im->files[f].used);
        p += im->files[f].used;
    }
    return in;
}

/* A padding frame of `count` offsets (the stream form append_frames takes). */
static void append_padding(shmq_log *log, uint32_t count)
{
    uint8_t frame[SHMQ_MIN_FRAME] = { 0 };
    uint64_t h = (uint64_t)SHMQ_MIN_FRAME | ((uint64_t)count << 32) | ((uint64_t)SHMQ_FRAME_PADDING << 62);
    memcpy(frame, &h, 8);
    shmq_batch_encode_empty(frame + 8, SHMQ_BATCH_HEADER_SIZE, 0, (int32_t)count, 1);
    int64_t rc = shmq_log_append_frames(log, frame, sizeof frame);
    if (rc < 0)
        fuzz_die("append a padding frame", rc);
}

size_t fuzz_image_seeds(fuzz_image *im, fuzz_input *out)
{
    size_t n = 0;
    out[n++] = fuzz_image_read(im);                          /* empty */
    fuzz_fill_log(im->writer, im->pstate, 1, 5);
    out[n++] = fuzz_image_read(im);                          /* a few records */
    fuzz_fill_log(im->writer, im->pstate, 2, 30);
    out[n++] = fuzz_image_read(im);                          /* two segments */
    fuzz_fill_log(im->writer, im->pstate, 3, 200);
    out[n++] = fuzz_image_read(im);                          /* recycled slots */
    shmq_log_reset(im->writer, 1000);
    fuzz_fill_log(im->writer, NULL, 4, 10);
    append_padding(im->writer, 3);
    fuzz_fill_log(im->writer, NULL, 5, 10);
    out[n++] = fuzz_image_read(im);                          /* a padding frame */
    shmq_log_set_replication(im->writer, 1, 3, 0, 1, 1000);
    shmq_log_advance_hw(im->writer, 1005);
    fuzz_fill_log(im->writer, NULL, 6, 12);
    out[n++] = fuzz_image_read(im);                          /* replicated, HW inside */
    return n;
}

/* Read from cur until nothing more comes (bounded), alternating CRC checks. */
void fuzz_drain(shmq_log *log, shmq_cursor *cur)
{
    static uint8_t dst[2 * FUZZ_IMG_SEG];
    static shmq_record_view views[128];
    static uint8_t fixed[FUZZ_IMG_SEG];
    for (int k = 0; k < 8; k++) {
        shmq_log_ready(log, cur);
        int64_t used = 0;
        int64_t n = shmq_log_read(log, cur, dst, sizeof dst, views, k == 1 ? 3 : 128, k & 1, &used);
        if (n <= 0)
            return;
        int64_t w = views[0].value_len;
        if (w >= 0 && w * n <= (int64_t)sizeof fixed)
            shmq_gather_fixed(dst, used, views, n, 0, w, fixed);
    }
}

