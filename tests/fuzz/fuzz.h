/*
 * Fuzz harnesses of the C core: one harness per function family that reads
 * bytes another process may have written (see README.md).
 *
 * A harness defines LLVMFuzzerInitialize, LLVMFuzzerTestOneInput (the
 * libFuzzer entry points, so the same file builds with -fsanitize=fuzzer
 * under clang) and fuzz_seeds, which builds valid inputs with the C core
 * itself (real logs, real batches). Without libFuzzer, fuzz_driver.c
 * supplies main(): replay files, then a seeded mutation loop.
 *
 * A harness must be deterministic for one input and must not leave state
 * behind that changes what the next input does (files are rewritten from
 * the input on every call).
 */
#ifndef SHMQ_FUZZ_H
#define SHMQ_FUZZ_H
#include <stddef.h>
#include <stdint.h>

#include "log.h"
#include "producer_state.h"
#include "record_batch.h"

typedef struct fuzz_input {
    uint8_t *data;
    size_t len;
} fuzz_input;

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
/* Fill out[0..max) with valid inputs (malloc'd); returns how many. */
size_t fuzz_seeds(fuzz_input *out, size_t max);

/* ------------------------------------------------ helpers (fuzz_common.c) */

/* A fresh private directory (mode 0700) under /dev/shm (or $TMPDIR), whose
 * files are removed at exit. Aborts on failure. */
const char *fuzz_dir(const char *tag);
/* Remove those directories now (at exit, and when a crash ends the
 * process without exit handlers). */
void fuzz_remove_dirs(void);
/* Abort with a message naming what failed (harness setup, not the input). */
void fuzz_die(const char *what, int64_t rc);
/* Create a log of `slots` slots of `seg` bytes in dir and open it (flags:
 * SHMQ_FLAG_OVERFLOW_BLOCK or 0 for overwrite, which never waits). */
shmq_log *fuzz_new_log(const char *dir, uint32_t slots, uint64_t seg, uint32_t interval, uint32_t flags);
/* Append n varied records (keys, nulls, headers, several records per batch,
 * timestamps out of order, idempotent batches when ps is not NULL) derived
 * from seed; stops early when the ring is full. */
void fuzz_fill_log(shmq_log *log, shmq_pstate *ps, uint32_t seed, int n);
/* Map file dir/name read-write (size *len); aborts on failure. */
uint8_t *fuzz_map(const char *dir, const char *name, size_t *len);
/* Raw frame stream of everything in log from its start (shmq_log_read_frames);
 * returns its length, the stream malloc'd in *out. */
size_t fuzz_log_frames(shmq_log *log, uint8_t **out);
/* CLOCK_MONOTONIC in ns, straight from the kernel (clock_gettime itself
 * runs fast in a harness, see fuzz_common.c). */
int64_t fuzz_real_ns(void);
/* Deterministic PRNG (splitmix64). */
uint64_t fuzz_rand(uint64_t *state);

/* ------------------------------------- log images (fuzz_log, fuzz_unblock)
 *
 * An image of a whole log of FUZZ_IMG_SLOTS slots of FUZZ_IMG_SEG bytes:
 * the meaningful bytes of each file in a row (the rest of every file is
 * zero):
 *   partition.ctl  header + slot table + reader table   (FUZZ_IMG_CTL)
 *   per slot i:    i.log (SEG), i.index (IDX), i.timeindex (TIDX)
 * fuzz_image_log creates such a log in a fresh directory (overwrite mode,
 * with a producer-state table) and maps its files; fuzz_image_write puts an
 * input into the files, fuzz_image_read takes the files as an input. */
#define FUZZ_IMG_SLOTS 3
#define FUZZ_IMG_SEG 4096
#define FUZZ_IMG_INTERVAL 256
#define FUZZ_IMG_CTL (SHMQ_CTL_HEADER_SIZE + FUZZ_IMG_SLOTS * SHMQ_CTL_SLOT_SIZE + SHMQ_MAX_READERS * SHMQ_READER_SLOT_SIZE)
#define FUZZ_IMG_IDX ((FUZZ_IMG_SEG / FUZZ_IMG_INTERVAL + 1) * 8)
#define FUZZ_IMG_TIDX ((FUZZ_IMG_SEG / FUZZ_IMG_INTERVAL + 1) * 16)
#define FUZZ_IMG_BYTES (FUZZ_IMG_CTL + FUZZ_IMG_SLOTS * (FUZZ_IMG_SEG + FUZZ_IMG_IDX + FUZZ_IMG_TIDX))
#define FUZZ_IMG_FILES (1 + 3 * FUZZ_IMG_SLOTS)

typedef struct fuzz_image {
    const char *dir;
    shmq_log *writer;              /* the handle that builds seeds */
    shmq_pstate *pstate;
    struct { uint8_t *map; size_t len, used; } files[FUZZ_IMG_FILES];
} fuzz_image;

void fuzz_image_log(fuzz_image *im, const char *tag);
void fuzz_image_write(fuzz_image *im, const uint8_t *data, size_t size);
fuzz_input fuzz_image_read(const fuzz_image *im);
/* The seeds of a log image, made by im->writer: empty, a few records, two
 * segments, recycled slots, a padding frame, replicated with the HW inside.
 * Returns how many (at most FUZZ_IMG_SEEDS). */
#define FUZZ_IMG_SEEDS 6
size_t fuzz_image_seeds(fuzz_image *im, fuzz_input *out);
/* Read from cur until nothing more comes (bounded), alternating CRC checks
 * and decoding fixed-width values in bulk. */
void fuzz_drain(shmq_log *log, shmq_cursor *cur);

#endif
