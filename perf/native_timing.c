/*
 * Timing loop for the C core alone (no Python): what one append / read costs
 * inside shmq/native, and its parts. Built and run by perf/profile_log.py:
 *
 *   cc -O2 -std=gnu11 -I shmq/native perf/native_timing.c shmq/native/{log,record_batch,crc32c,murmur2,wait}.c
 *   ./a.out VALUE_BYTES RECORDS
 *
 * Prints one "name ns_per_op" line per measurement (median of 5 runs).
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "log.h"
#include "record_batch.h"

static int64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000LL + t.tv_nsec;
}

static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

#define RUNS 5
#define TIME(label, n, body)                                              \
    do {                                                                  \
        double r_[RUNS];                                                  \
        for (int k_ = 0; k_ < RUNS; k_++) {                               \
            int64_t t0_ = now_ns();                                       \
            for (long i = 0; i < (n); i++) { body; }                      \
            r_[k_] = (double)(now_ns() - t0_) / (double)(n);              \
        }                                                                 \
        qsort(r_, RUNS, sizeof r_[0], cmp_d);                             \
        printf("%-34s %9.1f\n", label, r_[RUNS / 2]);                     \
    } while (0)

static volatile uint64_t sink;

int main(int argc, char **argv)
{
    int vlen = argc > 1 ? atoi(argv[1]) : 64;
    long n = argc > 2 ? atol(argv[2]) : 200000;
    char dir[] = "/dev/shm/shmq-ctiming-XXXXXX";
    if (!mkdtemp(dir))
        return 1;
    /* Big segments so that the timed appends never seal or prepare a slot
     * (that cost is measured separately below). */
    uint64_t seg = 512ULL << 20;
    shmq_log_config cfg = { 2, seg, 4096, 0, 1000000000ULL };
    int rc = shmq_log_create(dir, &cfg);
    shmq_log *log = NULL;
    if (rc || (rc = shmq_log_open(dir, &log))) {
        fprintf(stderr, "create/open failed: %d\n", rc);
        return 1;
    }
    char *v = calloc(1, (size_t)vlen);
    uint8_t *buf = malloc(1 << 20);
    int64_t bl = shmq_batch_size1(-1, vlen, 0);
    long fit = (long)(seg / (uint64_t)((bl + 8 + 7) & ~7)) / (RUNS * 3 + 2);
    if (n > fit)
        n = fit;

    TIME("clock_gettime(MONOTONIC)", n, sink += (uint64_t)now_ns());
    TIME("clock_gettime(REALTIME)", n, { struct timespec ts; clock_gettime(CLOCK_REALTIME, &ts); sink += ts.tv_nsec; });
    TIME("batch_encode1 (incl. CRC)", n,
         sink += shmq_batch_encode1(buf, 1 << 20, i, 12345, NULL, -1, (const uint8_t *)v, vlen, NULL, 0, NULL));
    TIME("crc32c over the batch body", n, sink += shmq_crc32c(0, buf + 21, (size_t)bl - 21));
    {
        uint64_t word = 0, hdr = 0;
        TIME("3 atomics (xadd + 2 CAS), no share", n, {
            __atomic_fetch_add(&word, 0x100000090ULL, __ATOMIC_ACQ_REL);
            uint64_t e = hdr;
            __atomic_compare_exchange_n(&hdr, &e, e + 1, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
            e = hdr;
            __atomic_compare_exchange_n(&hdr, &e, e + 1, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
        });
    }
    TIME("shmq_log_append_value", n, sink += (uint64_t)shmq_log_append_value(log, v, vlen));
    TIME("shmq_log_append1 (timestamp given)", n,
         sink += (uint64_t)shmq_log_append1(log, NULL, -1, v, vlen, NULL, 0, 1234567, NULL, -1));
    {
        shmq_records r;
        memset(&r, 0, sizeof r);
        int rows = 1000;
        uint8_t *vals = calloc((size_t)rows, (size_t)vlen);
        r.count = (uint32_t)rows;
        r.values = vals;
        r.value_width = vlen;
        r.base_timestamp = 1234567;
        long nb = n / rows > 0 ? n / rows : 1;
        double r_[RUNS];
        for (int k = 0; k < RUNS; k++) {
            int64_t t0 = now_ns();
            for (long i = 0; i < nb; i++)
                sink += (uint64_t)shmq_log_append(log, &r, NULL, -1);
            r_[k] = (double)(now_ns() - t0) / (double)(nb * rows);
        }
        qsort(r_, RUNS, sizeof r_[0], cmp_d);
        printf("%-34s %9.1f\n", "shmq_log_append 1000 rows, per rec", r_[RUNS / 2]);
        free(vals);
    }
    /* Read everything appended so far (single-record frames first). */
    {
        shmq_cursor cur;
        shmq_record_view *views = malloc(sizeof *views * 1024);
        int64_t used;
        double r_[RUNS];
        long total = 0;
        for (int k = 0; k < RUNS; k++) {
            shmq_log_seek(log, &cur, 0);
            long got = 0;
            int64_t t0 = now_ns();
            while (got < n) {
                int64_t m = shmq_log_read(log, &cur, buf, 1 << 20, views, 1024, 0, &used);
                if (m <= 0)
                    break;
                got += m;
            }
            r_[k] = (double)(now_ns() - t0) / (double)got;
            total = got;
        }
        qsort(r_, RUNS, sizeof r_[0], cmp_d);
        printf("%-34s %9.1f   (%ld records)\n", "shmq_log_read 1024/call, per rec", r_[RUNS / 2], total);
        shmq_log_seek(log, &cur, shmq_log_end_offset(log));
        TIME("shmq_log_read at the end (poll)", n, sink += (uint64_t)shmq_log_read(log, &cur, buf, 1 << 20, views, 64, 0, &used));
        free(views);
    }
    shmq_log_close(log);
    char cmd[256];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    if (system(cmd)) {}

    /* Slot preparation on the producer's path: 64 MiB x 4 ring, nobody
     * housekeeping; append until the ring wrapped once. */
    char dir2[] = "/dev/shm/shmq-ctiming-XXXXXX";
    if (!mkdtemp(dir2))
        return 1;
    shmq_log_config cfg2 = { 4, 64ULL << 20, 4096, 0, 1000000000ULL };
    if (shmq_log_create(dir2, &cfg2) || shmq_log_open(dir2, &log))
        return 1;
    long ring = (long)(4 * (64ULL << 20) / (uint64_t)((bl + 8 + 7) & ~7)) * 5 / 4;
    int64_t worst = 0, t_all = now_ns();
    for (long i = 0; i < ring; i++) {
        int64_t t0 = now_ns();
        sink += (uint64_t)shmq_log_append_value(log, v, vlen);
        int64_t d = now_ns() - t0;
        if (d > worst)
            worst = d;
    }
    t_all = now_ns() - t_all;
    printf("%-34s %9.1f   (worst single append %.2f ms, %ld records, 64 MiB x 4 ring)\n",
           "append_value, ring turn, inline prep", (double)t_all / (double)ring, worst / 1e6, ring);
    shmq_log_close(log);
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir2);
    if (system(cmd)) {}
    return 0;
}
