/*
 * Harness: the idempotent-producer state table another process may have
 * scribbled on (producer_state.c): open (header validation), lookup,
 * idempotent append and fence against the table, and the rebuild from a
 * frame stream (shmq_pstate_observe_frames) over the scribbled table.
 * Input: an image of <dir>/producer.state (ENTRIES entries).
 */
#include <stdlib.h>
#include <string.h>

#include "fuzz.h"

#define ENTRIES 16
#define TABLE_BYTES (SHMQ_PSTATE_HEADER_SIZE + ENTRIES * SHMQ_PSTATE_ENTRY_SIZE)

static const char *dir;
static shmq_log *log_;
static shmq_pstate *writer;
static uint8_t *table;
static size_t table_len;
static uint8_t *stream;            /* a valid frame stream with idempotent batches */
static size_t stream_len;

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    dir = fuzz_dir("pstate");
    log_ = fuzz_new_log(dir, 3, 8192, 512, 0);
    if (shmq_pstate_create(dir, ENTRIES) != SHMQ_OK || shmq_pstate_open(dir, &writer) != SHMQ_OK)
        fuzz_die("producer state table", -1);
    table = fuzz_map(dir, "producer.state", &table_len);
    fuzz_fill_log(log_, writer, 21, 12);
    stream_len = fuzz_log_frames(log_, &stream);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    size_t n = size < table_len ? size : table_len;
    memcpy(table, data, n);
    memset(table + n, 0, table_len - n);
    shmq_pstate *ps;
    if (shmq_pstate_open(dir, &ps) != SHMQ_OK)
        return 0;
    int64_t ids[ENTRIES + 4] = { 1000, 1001, 1002, 0 };
    for (int i = 0; i < ENTRIES; i++) {               /* every id the image names */
        uint64_t w = 0;
        if (n >= SHMQ_PSTATE_HEADER_SIZE + (size_t)(i + 1) * SHMQ_PSTATE_ENTRY_SIZE)
            memcpy(&w, data + SHMQ_PSTATE_HEADER_SIZE + (size_t)i * SHMQ_PSTATE_ENTRY_SIZE, 8);
        ids[4 + i] = (int64_t)(w - 1);
    }
    for (int i = 0; i < ENTRIES + 4; i++) {
        int16_t epoch = 0;
        int32_t first = 0, last = -1;
        int64_t off = 0;
        int found = shmq_pstate_lookup(ps, ids[i], &epoch, &first, &last, &off);
        if (i < 6 && ids[i] >= 0) {
            int dup = 0;
            int32_t next = found ? (last == INT32_MAX ? 0 : last + 1) : 0;
            shmq_pstate_append1(ps, log_, "k", 1, "value", 5, NULL, 0, 1700000000000LL, ids[i],
                                found ? epoch : 0, next, 1000000, &dup);
            if (i == 1)
                shmq_pstate_fence(ps, ids[i], (int16_t)(epoch + 1), 1000000);
        }
    }
    shmq_pstate_observe_frames(ps, stream, (int64_t)stream_len);
    shmq_pstate_close(ps);
    return 0;
}

static fuzz_input image(void)
{
    fuzz_input in = { malloc(TABLE_BYTES), TABLE_BYTES };
    memcpy(in.data, table, TABLE_BYTES);
    return in;
}

size_t fuzz_seeds(fuzz_input *out, size_t max)
{
    size_t n = 0;
    (void)max;
    out[n++] = image();                                   /* filled by Initialize */
    shmq_pstate_fence(writer, 1001, 7, 1000000);
    shmq_pstate_fence(writer, 5, 0, 1000000);
    out[n++] = image();
    shmq_pstate_clear(writer);
    out[n++] = image();
    return n;
}
