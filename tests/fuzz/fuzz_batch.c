/*
 * Harness: Kafka RecordBatch v2 check and decode (record_batch.c), as every
 * read path applies them to bytes from shared memory, and the raw append of
 * a batch a Kafka client sent through the listener: shmq_log_append_raw and
 * the idempotent shmq_pstate_append_raw (first time and retry), then read
 * back (shmq_log_read, shmq_log_read_frames). Input: one batch; it is also
 * appended with its CRC set right, so mutations get past the CRC check.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz.h"

#define MAX_VIEWS 256

static shmq_log *log_;
static shmq_pstate *pstate;

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    const char *dir = fuzz_dir("batch");
    log_ = fuzz_new_log(dir, 3, FUZZ_IMG_SEG, 512, 0);        /* overwrite: appends never wait */
    if (shmq_pstate_create(dir, 8) != SHMQ_OK || shmq_pstate_open(dir, &pstate) != SHMQ_OK)
        fuzz_die("producer state table", -1);
    return 0;
}

static uint32_t be32_at(const uint8_t *p) { return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3]; }

/* The listener's path: raw appends into an empty log, then everything read back. */
static void append_raw(uint8_t *buf, int64_t len)
{
    static uint8_t frames[2 * FUZZ_IMG_SEG];
    shmq_log_reset(log_, 0);
    shmq_pstate_clear(pstate);
    shmq_log_append_raw(log_, buf, len, 0);
    for (int k = 0; k < 2; k++) {
        int dup = 0;
        shmq_pstate_append_raw(pstate, log_, buf, len, 0, &dup);
    }
    shmq_log_append_raw(log_, buf, len, 0);
    shmq_cursor cur;
    if (shmq_log_seek(log_, &cur, 0) == SHMQ_OK)
        fuzz_drain(log_, &cur);
    if (shmq_log_seek(log_, &cur, 0) == SHMQ_OK)
        while (shmq_log_read_frames(log_, &cur, frames, sizeof frames, 1) > 0)
            ;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static shmq_record_view views[MAX_VIEWS];
    static uint8_t out[1 << 16];
    /* An exact-size heap copy, so ASan sees any read past the input. */
    uint8_t *buf = malloc(size ? size : 1);
    memcpy(buf, data, size);
    int64_t len = (int64_t)size;
    shmq_batch_check(buf, len, 1);
    int64_t blen = shmq_batch_check(buf, len, 0);
    if (blen > 0 && blen <= len) {
        int64_t base = 0;
        memcpy(&base, buf, 8);
        base = (int64_t)__builtin_bswap64((uint64_t)base);
        for (int pass = 0; pass < 3; pass++) {
            int64_t min = pass == 0 || base > INT64_MAX - 3 ? 0 : base + 2 * pass - 1;
            int64_t n = shmq_batch_decode(buf, blen, min, views, pass == 2 ? 2 : MAX_VIEWS);
            if (n > 0) {
                int64_t w = views[0].value_len;
                if (w >= 0 && w * n <= (int64_t)sizeof out)
                    shmq_gather_fixed(buf, blen, views, n, 0, w, out);
                w = views[0].key_len;
                if (w >= 0 && w * n <= (int64_t)sizeof out)
                    shmq_gather_fixed(buf, blen, views, n, 1, w, out);
            }
        }
    }
    append_raw(buf, len);
    if (len >= SHMQ_BATCH_HEADER_SIZE) {                       /* the same bytes, CRC set right */
        int64_t n = (int64_t)be32_at(buf + SHMQ_BATCH_OFF_LENGTH) + 12;
        if (n >= SHMQ_BATCH_HEADER_SIZE && n <= len) {
            uint32_t crc = shmq_crc32c(0, buf + SHMQ_BATCH_OFF_ATTRIBUTES, (size_t)(n - SHMQ_BATCH_OFF_ATTRIBUTES));
            for (int b = 0; b < 4; b++)
                buf[SHMQ_BATCH_OFF_CRC + b] = (uint8_t)(crc >> (24 - 8 * b));
            append_raw(buf, len);
            if (n < len)
                append_raw(buf, n);
        }
    }
    free(buf);
    return 0;
}

static fuzz_input encoded(const shmq_records *r, int64_t base, const shmq_batch_meta *meta)
{
    int64_t n = shmq_batch_size(r);
    if (n < 0)
        fuzz_die("shmq_batch_size", n);
    fuzz_input in = { malloc((size_t)n), (size_t)n };
    if (shmq_batch_encode(in.data, n, r, base, meta) != n)
        fuzz_die("shmq_batch_encode", n);
    return in;
}

size_t fuzz_seeds(fuzz_input *out, size_t max)
{
    static const uint8_t vals[] = "value-0value-1value-2value-3value-4";
    static const int64_t offs[] = { 0, 7, 7, 21, 28, 35 };
    static const uint8_t nulls[] = { 0, 1, 0, 0, 0 };
    static const uint8_t hdrs[] = { 2, 4, 'h', '1', 4, 'v', 'v', 4, 2, 'a', 1, 2, 'b', 0 };
    static const int64_t hoffs[] = { 0, 7, 7, 7, 14, 14 };
    static const int64_t tss[] = { 5, 3, 1000, 1 << 20, 9 };
    shmq_batch_meta idem = { 77, 3, 41, 0, 5 };
    size_t n = 0;
    shmq_records one = { .count = 1, .values = vals, .value_width = 7, .base_timestamp = 1700000000000LL };
    out[n++] = encoded(&one, 0, NULL);
    shmq_records many = { .count = 5, .values = vals, .value_offs = offs, .value_null = nulls, .keys = vals,
                          .key_width = 3, .headers = hdrs, .header_offs = hoffs, .base_timestamp = 1,
                          .timestamps = tss };
    out[n++] = encoded(&many, 123456789, &idem);
    shmq_records nulls_only = { .count = 3, .base_timestamp = -1 };
    out[n++] = encoded(&nulls_only, 1, NULL);
    uint8_t *b = malloc(200);
    int64_t len = shmq_batch_encode1(b, 200, 9, 17, vals, 3, vals, 20, hdrs, 7, &idem);
    out[n++] = (fuzz_input){ b, (size_t)len };
    b = malloc(SHMQ_BATCH_HEADER_SIZE);
    shmq_batch_encode_empty(b, SHMQ_BATCH_HEADER_SIZE, 40, 3, 17);
    out[n++] = (fuzz_input){ b, SHMQ_BATCH_HEADER_SIZE };
    (void)max;
    return n;
}
