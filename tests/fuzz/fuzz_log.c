/*
 * Harness: everything a reader does with a log another process wrote:
 * control-block validation at open (shmq_log_open), start/end offsets,
 * index lookups (shmq_log_seek), time-index lookups (shmq_log_seek_time),
 * frame scan and read (shmq_log_read, shmq_log_read_frames, shmq_log_ready),
 * the reader table (register, sweep, retention floor) and one append that
 * must not wait (claim, seal, slot preparation over the scribbled words).
 *
 * Input: an image of a whole log of SLOTS slots, the meaningful bytes of each
 * file in a row (the rest of every file is zero):
 *   partition.ctl  header + slot table + reader table   (CTL_BYTES)
 *   per slot i:    i.log (SEG), i.index (IDX_BYTES), i.timeindex (TIDX_BYTES)
 * Each input is written into the files, then a fresh handle opens them.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz.h"

#define SLOTS 3
#define SEG 4096
#define INTERVAL 256
#define CTL_BYTES (SHMQ_CTL_HEADER_SIZE + SLOTS * SHMQ_CTL_SLOT_SIZE + SHMQ_MAX_READERS * SHMQ_READER_SLOT_SIZE)
#define IDX_BYTES ((SEG / INTERVAL + 1) * 8)
#define TIDX_BYTES ((SEG / INTERVAL + 1) * 16)
#define IMAGE_BYTES (CTL_BYTES + SLOTS * (SEG + IDX_BYTES + TIDX_BYTES))
#define NFILES (1 + 3 * SLOTS)

static const char *dir;
static shmq_log *writer;           /* the handle that builds seeds */
static shmq_pstate *pstate;
static struct { uint8_t *map; size_t len, used; } files[NFILES];

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    dir = fuzz_dir("log");
    writer = fuzz_new_log(dir, SLOTS, SEG, INTERVAL, 0);
    if (shmq_pstate_create(dir, 16) != SHMQ_OK || shmq_pstate_open(dir, &pstate) != SHMQ_OK)
        fuzz_die("producer state table", -1);
    files[0].map = fuzz_map(dir, "partition.ctl", &files[0].len);
    files[0].used = CTL_BYTES;
    static const char *exts[] = { "log", "index", "timeindex" };
    static const size_t used[] = { SEG, IDX_BYTES, TIDX_BYTES };
    for (int i = 0; i < SLOTS; i++)
        for (int e = 0; e < 3; e++) {
            char name[64];
            snprintf(name, sizeof name, "%d.%s", i, exts[e]);
            files[1 + 3 * i + e].map = fuzz_map(dir, name, &files[1 + 3 * i + e].len);
            files[1 + 3 * i + e].used = used[e];
        }
    return 0;
}

static void image_to_files(const uint8_t *data, size_t size)
{
    for (int f = 0; f < NFILES; f++) {
        size_t n = size < files[f].used ? size : files[f].used;
        memcpy(files[f].map, data, n);
        memset(files[f].map + n, 0, files[f].len - n);
        data += n;
        size -= n;
    }
}

static fuzz_input image_from_files(void)
{
    fuzz_input in = { malloc(IMAGE_BYTES), IMAGE_BYTES };
    uint8_t *p = in.data;
    for (int f = 0; f < NFILES; f++) {
        memcpy(p, files[f].map, files[f].used);
        p += files[f].used;
    }
    return in;
}

/* Read from cur until nothing more comes (bounded), alternating CRC checks. */
static void drain(shmq_log *log, shmq_cursor *cur)
{
    static uint8_t dst[2 * SEG];
    static shmq_record_view views[128];
    static uint8_t fixed[SEG];
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

static void drain_frames(shmq_log *log, shmq_cursor *cur)
{
    static uint8_t dst[2 * SEG];
    for (int k = 0; k < 8; k++) {
        int64_t n = shmq_log_read_frames(log, cur, dst, k == 2 ? 100 : (int64_t)sizeof dst, k & 1);
        if (n <= 0)
            return;
        shmq_frames_epochs(dst, n, -1, (int32_t[4]){ 0 }, (int64_t[4]){ 0 }, 4);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    image_to_files(data, size);
    shmq_log *log;
    if (shmq_log_open(dir, &log) != SHMQ_OK)
        return 0;
    int64_t start = shmq_log_start_offset(log), end = shmq_log_end_offset(log);
    shmq_log_high_watermark(log);
    int64_t targets[] = { start, end, start + (end - start) / 2, end - 1, start + 1, 0, 5, 1000, 1037 };
    for (size_t t = 0; t < sizeof targets / sizeof targets[0]; t++) {
        shmq_cursor cur;
        if (shmq_log_seek(log, &cur, targets[t]) == SHMQ_OK) {
            if (t & 1)
                drain_frames(log, &cur);
            else
                drain(log, &cur);
        }
    }
    int64_t times[] = { 0, 1700000000000LL + 40, 1700000000000LL + 400, INT64_MAX, -1 };
    for (size_t t = 0; t < sizeof times / sizeof times[0]; t++) {
        shmq_cursor cur;
        if (shmq_log_seek_time(log, &cur, times[t]) >= 0)
            drain(log, &cur);
    }
    shmq_cursor rc;
    memset(&rc, 0, sizeof rc);
    if (shmq_log_reader_register(log, &rc, start, SHMQ_READER_TETHERED, SHMQ_READER_KIND_LOG, "fuzz") >= 0) {
        if (shmq_log_seek(log, &rc, start) == SHMQ_OK)
            drain(log, &rc);
        shmq_log_reader_release(log, &rc);
    }
    shmq_log_readers_sweep(log);
    int32_t holder;
    shmq_log_retention_floor(log, &holder);
    shmq_log_append1(log, "k", 1, "fuzz", 4, NULL, 0, 1700000000000LL, NULL, 0);
    shmq_log_close(log);
    return 0;
}

/* A padding frame of `count` offsets (the stream form append_frames takes). */
static void append_padding(uint32_t count)
{
    uint8_t frame[SHMQ_MIN_FRAME] = { 0 };
    uint64_t h = (uint64_t)SHMQ_MIN_FRAME | ((uint64_t)count << 32) | ((uint64_t)SHMQ_FRAME_PADDING << 62);
    memcpy(frame, &h, 8);
    shmq_batch_encode_empty(frame + 8, SHMQ_BATCH_HEADER_SIZE, 0, (int32_t)count, 1);
    int64_t rc = shmq_log_append_frames(writer, frame, sizeof frame);
    if (rc < 0)
        fuzz_die("append a padding frame", rc);
}

size_t fuzz_seeds(fuzz_input *out, size_t max)
{
    size_t n = 0;
    (void)max;
    out[n++] = image_from_files();                           /* empty */
    fuzz_fill_log(writer, pstate, 1, 5);
    out[n++] = image_from_files();                           /* a few records */
    fuzz_fill_log(writer, pstate, 2, 30);
    out[n++] = image_from_files();                           /* two segments */
    fuzz_fill_log(writer, pstate, 3, 200);
    out[n++] = image_from_files();                           /* recycled slots */
    shmq_log_reset(writer, 1000);
    fuzz_fill_log(writer, NULL, 4, 10);
    append_padding(3);
    fuzz_fill_log(writer, NULL, 5, 10);
    out[n++] = image_from_files();                           /* a padding frame */
    shmq_log_set_replication(writer, 1, 3, 0, 1, 1000);
    shmq_log_advance_hw(writer, 1005);
    fuzz_fill_log(writer, NULL, 6, 12);
    out[n++] = image_from_files();                           /* replicated, HW inside */
    return n;
}
