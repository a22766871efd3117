/*
 * Harness: a raw frame stream as a follower copies it from a leader's
 * segments: shmq_frames_epochs, shmq_log_append_frames into a log (then read
 * back with shmq_log_read_frames and shmq_log_read), and the producer-state
 * rebuild shmq_pstate_observe_frames. Input: a frame stream (log.h, "Raw
 * frame stream").
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz.h"

static shmq_log *log_;
static shmq_pstate *pstate;

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    const char *dir = fuzz_dir("frames");
    log_ = fuzz_new_log(dir, 4, 8192, 512, 0);
    if (shmq_pstate_create(dir, 8) != SHMQ_OK || shmq_pstate_open(dir, &pstate) != SHMQ_OK)
        fuzz_die("producer state table", -1);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static uint8_t dst[1 << 16];
    static shmq_record_view views[256];
    uint8_t *buf = malloc(size ? size : 1);   /* exact size: ASan sees overreads */
    memcpy(buf, data, size);
    int32_t epochs[8];
    int64_t starts[8];
    shmq_frames_epochs(buf, (int64_t)size, -1, epochs, starts, 8);
    shmq_pstate_clear(pstate);
    if (shmq_pstate_observe_frames(pstate, buf, (int64_t)size) == SHMQ_OK)
        for (int64_t id = 0; id < 4; id++)
            shmq_pstate_lookup(pstate, 1000 + id, NULL, NULL, NULL, NULL);
    /* The stream's first data frame names its base offset: start there. */
    int64_t base = 0;
    if (size >= 16) {
        memcpy(&base, buf + 8, 8);
        base = (int64_t)__builtin_bswap64((uint64_t)base);
        if (base < 0 || base > (1LL << 40))
            base = 0;
    }
    if (shmq_log_reset(log_, base) < 0)
        fuzz_die("shmq_log_reset", base);
    int64_t end = shmq_log_append_frames(log_, buf, (int64_t)size);
    if (end >= 0 && end != shmq_log_end_offset(log_)) {
        fprintf(stderr, "append_frames returned end %lld, the log ends at %lld\n", (long long)end,
                (long long)shmq_log_end_offset(log_));
        abort();
    }
    shmq_cursor cur;
    if (shmq_log_seek(log_, &cur, shmq_log_start_offset(log_)) == SHMQ_OK)
        while (shmq_log_read_frames(log_, &cur, dst, sizeof dst, 1) > 0)
            ;
    if (shmq_log_seek(log_, &cur, shmq_log_start_offset(log_)) == SHMQ_OK) {
        int64_t used;
        while (shmq_log_read(log_, &cur, dst, sizeof dst, views, 256, 1, &used) > 0)
            ;
    }
    free(buf);
    return 0;
}

size_t fuzz_seeds(fuzz_input *out, size_t max)
{
    size_t n = 0;
    (void)max;
    fuzz_fill_log(log_, pstate, 11, 6);
    out[n].len = fuzz_log_frames(log_, &out[n].data);
    n++;
    shmq_log_reset(log_, 500);
    fuzz_fill_log(log_, pstate, 12, 40);
    out[n].len = fuzz_log_frames(log_, &out[n].data);
    n++;
    return n;
}
