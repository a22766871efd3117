/*
 * Harness: what the housekeeper and a stuck reader do to a log another
 * process scribbled on: housekeeping (shmq_log_housekeep: roll, prepare the
 * next slot, finish an abandoned seal, pad over a dead claim), the reader's
 * unblock check (shmq_log_unblock_cursor), truncation (shmq_log_truncate,
 * and the reset it falls back to below the start), the waits over the
 * scribbled words (shmq_log_wait, _wait_frames, _sleep_frames, _wait_hw)
 * and the doorbell of a multi-log wait (shmq_log_doorbell).
 *
 * Input: an image of a whole log (fuzz.h, "log images"), the same layout as
 * fuzz_log's; the seeds add dead claims (claimed header, claimed but never
 * written, a sealer that died past the capacity) and a held unblock lock.
 * The unblock timeout is 1 ms and a harness's clock moves 1 ms a reading,
 * so the second look at a stuck frame unblocks it.
 */
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fuzz.h"

static fuzz_image im;

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    fuzz_image_log(&im, "unblock");
    return 0;
}

static void housekeep(shmq_log *log, int rounds)
{
    shmq_unblock_state st;
    memset(&st, 0, sizeof st);
    for (int k = 0; k < rounds; k++)
        if (shmq_log_housekeep(log, &st) < 0)
            return;
}

/* Everything a stuck reader at cur does: wait, find it stuck, unblock, read. */
static void stuck_reader(shmq_log *log, shmq_cursor *cur, int64_t wait_ns)
{
    shmq_log_ready(log, cur);
    shmq_log_wait(log, cur, 0, wait_ns);
    shmq_log_wait_frames(log, cur, 0, 1000000);
    shmq_log_sleep_frames(log, cur, 1000000);
    shmq_unblock_state st;
    memset(&st, 0, sizeof st);
    for (int k = 0; k < 3; k++)
        if (shmq_log_unblock_cursor(log, cur, &st) < 0)
            break;
    fuzz_drain(log, cur);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fuzz_image_write(&im, data, size);
    shmq_log *log;
    if (shmq_log_open(im.dir, &log) != SHMQ_OK)
        return 0;
    uint32_t *word = NULL, val = 0;
    if (shmq_log_doorbell(log, 1, &word, &val) == SHMQ_OK)
        shmq_log_doorbell(log, -1, NULL, NULL);
    int64_t start = shmq_log_start_offset(log), end = shmq_log_end_offset(log);
    int64_t targets[] = { start, end, start + (end - start) / 2, end - 1 };
    for (size_t t = 0; t < sizeof targets / sizeof targets[0]; t++) {
        shmq_cursor cur;
        if (shmq_log_seek(log, &cur, targets[t]) == SHMQ_OK)
            stuck_reader(log, &cur, t == 1 ? 2500000 : 1000000);
    }
    shmq_log_wait_hw(log, end, 0, 1000000);
    shmq_log_wait_hw(log, start, 0, 0);
    housekeep(log, 4);
    /* Truncation as a returning replica does it, then the log grows again. */
    start = shmq_log_start_offset(log);
    end = shmq_log_end_offset(log);
    int64_t cuts[] = { end - 1, start + (end - start) / 2, start, start - 1 };
    for (size_t t = 0; t < sizeof cuts / sizeof cuts[0]; t++) {
        if (shmq_log_truncate(log, cuts[t]) < 0)
            break;
        shmq_cursor cur;
        if (shmq_log_seek(log, &cur, shmq_log_start_offset(log)) == SHMQ_OK)
            fuzz_drain(log, &cur);
        shmq_log_append1(log, "k", 1, "after truncate", 14, NULL, 0, 1700000000000LL, NULL, 0);
        housekeep(log, 2);
    }
    shmq_log_close(log);
    return 0;
}

/* A producer that claimed `len` bytes (one record) and died: the claim word
 * moved; write_header: its claimed header is in place (else the word is 0). */
static void dead_claim(shmq_log *log, uint32_t len, int write_header)
{
    uint64_t seq = __atomic_load_n(&shmq_log_header(log)->active_seq, __ATOMIC_ACQUIRE);
    uint32_t i = (uint32_t)(seq % shmq_log_slot_count(log));
    uint64_t c = __atomic_fetch_add(&shmq_log_slot(log, i)->claim, ((uint64_t)1 << 32) | len, __ATOMIC_SEQ_CST);
    uint64_t pos = c & 0xFFFFFFFFu, rel = c >> 32;
    if (write_header && pos + len <= shmq_log_segment_bytes(log)) {
        uint64_t h = (uint64_t)(uint32_t)-(int32_t)len | (rel << 32);
        __atomic_store_n((uint64_t *)(shmq_log_segment(log, i) + pos), h, __ATOMIC_RELEASE);
    }
}

size_t fuzz_seeds(fuzz_input *out, size_t max)
{
    size_t n = fuzz_image_seeds(&im, out);
    shmq_log *w = im.writer;
    shmq_log_set_replication(w, 0, 0, 0, 0, 0);
    shmq_log_reset(w, 0);
    fuzz_fill_log(w, NULL, 11, 3);
    dead_claim(w, 96, 1);
    fuzz_fill_log(w, NULL, 12, 3);
    out[n++] = fuzz_image_read(&im);                          /* a dead claim, records after it */
    dead_claim(w, 80, 0);
    out[n++] = fuzz_image_read(&im);                          /* claimed, header never written */
    shmq_log_reset(w, 500);
    fuzz_fill_log(w, NULL, 13, 4);
    dead_claim(w, FUZZ_IMG_SEG, 0);
    out[n++] = fuzz_image_read(&im);                          /* the sealer died past the capacity */
    __atomic_store_n(&shmq_log_header(w)->unblock_owner, (uint32_t)getpid(), __ATOMIC_RELEASE);
    out[n++] = fuzz_image_read(&im);                          /* ... and the unblock lock is held */
    __atomic_store_n(&shmq_log_header(w)->unblock_owner, 0x3FFFFFFFu, __ATOMIC_RELEASE);
    out[n++] = fuzz_image_read(&im);                          /* ... by a pid that cannot exist */
    __atomic_store_n(&shmq_log_header(w)->unblock_owner, 0, __ATOMIC_RELEASE);
    (void)max;
    return n;
}
