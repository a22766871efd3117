/*
 * Harness: everything a reader does with a log another process wrote:
 * control-block validation at open (shmq_log_open), start/end offsets,
 * index lookups (shmq_log_seek), time-index lookups (shmq_log_seek_time),
 * frame scan and read (shmq_log_read, shmq_log_read_frames, shmq_log_ready),
 * the reader table (register, sweep, retention floor) and one append that
 * must not wait (claim, seal, slot preparation over the scribbled words).
 *
 * Input: an image of a whole log (fuzz.h, "log images"); each input is
 * written into the files, then a fresh handle opens them.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz.h"

#define SEG FUZZ_IMG_SEG

static fuzz_image im;

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    fuzz_image_log(&im, "log");
    return 0;
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
    fuzz_image_write(&im, data, size);
    shmq_log *log;
    if (shmq_log_open(im.dir, &log) != SHMQ_OK)
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
                fuzz_drain(log, &cur);
        }
    }
    int64_t times[] = { 0, 1700000000000LL + 40, 1700000000000LL + 400, INT64_MAX, -1 };
    for (size_t t = 0; t < sizeof times / sizeof times[0]; t++) {
        shmq_cursor cur;
        if (shmq_log_seek_time(log, &cur, times[t]) >= 0)
            fuzz_drain(log, &cur);
    }
    shmq_cursor rc;
    memset(&rc, 0, sizeof rc);
    if (shmq_log_reader_register(log, &rc, start, SHMQ_READER_TETHERED, SHMQ_READER_KIND_LOG, "fuzz") >= 0) {
        if (shmq_log_seek(log, &rc, start) == SHMQ_OK)
            fuzz_drain(log, &rc);
        shmq_log_reader_release(log, &rc);
    }
    shmq_log_readers_sweep(log);
    int32_t holder;
    shmq_log_retention_floor(log, &holder);
    shmq_log_append1(log, "k", 1, "fuzz", 4, NULL, 0, 1700000000000LL, NULL, 0);
    shmq_log_close(log);
    return 0;
}

size_t fuzz_seeds(fuzz_input *out, size_t max)
{
    (void)max;
    return fuzz_image_seeds(&im, out);
}
