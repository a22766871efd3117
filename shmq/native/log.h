/*
 * Partition log: a ring of memory-mapped segment slots behind one control
 * block, appended by many processes at once through one atomic fetch-add.
 *
 * Files of one partition log (all created up front, sizes fixed):
 *
 *   partition.ctl     control block (this header's shmq_ctl_header + slots)
 *   <slot>.log        segment bytes: 8-byte aligned frames
 *   <slot>.index      offset index: one uint64 entry per index interval
 *   <slot>.timeindex  time index: two uint64 per index interval
 *
 * Control block (every line is 64 bytes; hot words sit alone in a line):
 *
 *   0    +--------------------------------------------------------------+
 *        | magic | version | slot_count | segment_bytes | index_interval|
 *        | flags | unblock_timeout_ns | created_ns | reserved           |
 *   64   +--------------------------------------------------------------+
 *        | active_seq      segment sequence that takes appends          |
 *   128  +--------------------------------------------------------------+
 *        | commit_seq (u32 futex word) | waiters (u32)                  |
 *   192  +--------------------------------------------------------------+
 *        | slowest_offset  lowest position still needed (block mode)    |
 *        | unblock_owner   pid holding the unblock lock, 0 = free       |
 *   256  +--------------------------------------------------------------+
 *        | deleted         1 once the topic is deleted (appends refused)  |
 *   320  +--------------------------------------------------------------+
 *        | reserved for replication (leader epoch, HW, fences)          |
 *   512  +--------------------------------------------------------------+
 *        | slot 0: claim line (64) | state line (64)                    |
 *        | slot 1 ...                                                   |
 *        +--------------------------------------------------------------+
 *
 * Slot words:
 *   claim       (record_count << 32) | byte_position. Producers fetch-add
 *               (n << 32) | frame_len; the old value is their claim.
 *   state_seq   (seq << 8) | state. seq is the segment sequence number held
 *               by the slot (slot = seq % slot_count); it is the generation
 *               readers re-check after every copy (seqlock).
 *   base_offset offset of the first record of segment seq.
 *   seal        0 while open; SEAL_BIT | count << 32 | size once sealed.
 *   max_timestamp, owner_pid (pid cleaning/activating the slot), changed_ns.
 *
 * Frame (8-byte aligned) = 8-byte header word + Kafka RecordBatch v2 + pad:
 *
 *   bit 0          32                62   64
 *       +----------+-----------------+----+
 *       | length   | rel_offset      |type|   (one little-endian uint64)
 *       +----------+-----------------+----+
 *   length < 0: claimed (the batch is being written), > 0: complete.
 *   type 0 data, 1 padding, 2 fenced (a claim taken over by an unblocker).
 *   rel_offset is the frame's first offset minus the segment's base offset.
 *   The word with length 0 and every other bit set is POISON: an unblocker
 *   fenced a word nobody had claimed yet, so a late producer's CAS fails.
 *
 * Every transition of a frame header is one CAS:
 *   0 -> claimed (producer), claimed -> data (producer commit, release),
 *   claimed -> fenced and 0 -> POISON (unblocker), then -> padding.
 * A padding frame's body holds an empty Kafka batch covering the dead
 * claim's offsets, for tools; readers never rely on it (a paused producer
 * may still scribble there), they take offsets from frame headers.
 */
#ifndef SHMQ_LOG_H
#define SHMQ_LOG_H
#include <stdint.h>
#include <stddef.h>
#include "record_batch.h"

#define SHMQ_LOG_MAGIC 0x31474F4C514D4853
#define SHMQ_LOG_VERSION 1
#define SHMQ_MAX_SLOTS 1024
#define SHMQ_CTL_HEADER_SIZE 512
#define SHMQ_CTL_SLOT_SIZE 128
#define SHMQ_FRAME_HEADER_SIZE 8
#define SHMQ_FRAME_ALIGN 8
#define SHMQ_MIN_FRAME 72
#define SHMQ_MIN_SEGMENT_BYTES 4096
#define SHMQ_MAX_SEGMENT_BYTES 1073741824
#define SHMQ_MAX_RECORDS_PER_SEGMENT 1073741823

#define SHMQ_FRAME_DATA 0
#define SHMQ_FRAME_PADDING 1
#define SHMQ_FRAME_FENCED 2

#define SHMQ_SLOT_EMPTY 0
#define SHMQ_SLOT_CLEANING 1
#define SHMQ_SLOT_CLEAN 2
#define SHMQ_SLOT_ACTIVATING 3
#define SHMQ_SLOT_ACTIVE 4

#define SHMQ_FLAG_OVERFLOW_BLOCK 1

/* Error codes beyond those of record_batch.h. */
#define SHMQ_ERR_OUT_OF_RANGE -10   /* offset below the log start (recycled) */
#define SHMQ_ERR_TIMEOUT -11        /* waited past the timeout */
#define SHMQ_ERR_RETRY -12          /* transient: call again */
#define SHMQ_ERR_IO -13             /* a system call failed; errno tells */
#define SHMQ_ERR_NOSPACE -14        /* the filesystem cannot hold the log */
#define SHMQ_ERR_BAD_LAYOUT -15     /* control block or files do not match */
#define SHMQ_ERR_FENCED -16         /* commit lost: the claim was padded over */
#define SHMQ_ERR_DELETED -17        /* the log's topic was deleted */
#define SHMQ_ERR_NOT_LEADER -18     /* the log is a follower or a fenced old leader */
#define SHMQ_ERR_DIVERGED -19       /* a copied frame's offset is not this log's end */
#define SHMQ_ERR_PRODUCER_FENCED -20 /* a newer epoch of this producer id appended */
#define SHMQ_ERR_DUPLICATE_SEQ -21  /* an older batch of this producer, already stored */
#define SHMQ_ERR_OUT_OF_ORDER_SEQ -22 /* a sequence gap: a batch of this producer is missing */

typedef struct shmq_ctl_header {
    uint64_t magic;
    uint32_t version;
    uint32_t slot_count;
    uint64_t segment_bytes;
    uint32_t index_interval;
    uint32_t flags;
    uint64_t unblock_timeout_ns;
    int64_t created_ns;
    uint64_t reserved0[2];
    /* line 1 */
    uint64_t active_seq;
    uint64_t pad1[7];
    /* line 2 */
    uint32_t commit_seq;
    uint32_t waiters;
    uint64_t pad2[7];
    /* line 3 */
    int64_t slowest_offset;
    uint32_t unblock_owner;
    uint32_t pad3a;
    uint64_t pad3[6];
    /* line 4: set once by the coordinator when the topic is deleted, before
     * the files are unlinked; appends then fail with SHMQ_ERR_DELETED */
    uint32_t deleted;
    uint32_t pad4a;
    uint64_t pad4[7];
    /* lines 5..7 */
    uint64_t reserved[24];
} shmq_ctl_header;

typedef struct shmq_ctl_slot {
    uint64_t claim;
    uint64_t pad_claim[7];
    uint64_t state_seq;
    int64_t base_offset;
    uint64_t seal;
    int64_t max_timestamp;
    uint32_t owner_pid;
    uint32_t pad_owner;
    int64_t changed_ns;
    uint64_t pad_state[2];
} shmq_ctl_slot;

/* Configuration of a new log. */
typedef struct shmq_log_config {
    uint32_t slot_count;
    uint64_t segment_bytes;
    uint32_t index_interval;
    uint32_t flags;
    uint64_t unblock_timeout_ns;
} shmq_log_config;

/* A reader's position: segment seq, byte position and the relative offset of
 * the frame at pos, plus the next offset it wants (records below it are
 * skipped when a seek lands inside a batch). */
typedef struct shmq_cursor {
    uint64_t seq;
    uint64_t pos;
    int64_t rel;
    int64_t next_offset;
} shmq_cursor;

/* Where a walker last saw the log blocked, and since when. */
typedef struct shmq_unblock_state {
    uint64_t seq;
    uint64_t pos;
    int64_t since_ns;
    uint64_t walk_seq;
    uint64_t walk_pos;
    int64_t walk_rel;
} shmq_unblock_state;

typedef struct shmq_log shmq_log;

/* Create the files of a new log in dir (which must exist). Fails with
 * SHMQ_ERR_NOSPACE when the filesystem cannot hold every slot. */
int shmq_log_create(const char *dir, const shmq_log_config *cfg);
/* Map an existing log; *out is set on success. */
int shmq_log_open(const char *dir, shmq_log **out);
void shmq_log_close(shmq_log *log);

shmq_ctl_header *shmq_log_header(shmq_log *log);
shmq_ctl_slot *shmq_log_slot(shmq_log *log, uint32_t index);
uint8_t *shmq_log_segment(shmq_log *log, uint32_t index);
uint32_t shmq_log_slot_count(shmq_log *log);
uint64_t shmq_log_segment_bytes(shmq_log *log);
/* Where the last error was found, for messages: the offset nearest to it and
 * the segment sequence and byte position. */
int64_t shmq_log_error_offset(shmq_log *log);
int64_t shmq_log_error_seq(shmq_log *log);
int64_t shmq_log_error_position(shmq_log *log);

/* Append one record; returns its offset (>= 0) or an error; *timestamp_out
 * receives the timestamp used (timestamp < 0 means "now"). Byte arguments are
 * char pointers so cffi passes Python bytes without a copy. */
int64_t shmq_log_append1(shmq_log *log, const char *key, int64_t key_len,
                         const char *value, int64_t value_len,
                         const char *headers, int64_t headers_len,
                         int64_t timestamp, int64_t *timestamp_out, int64_t timeout_ns);
/* The common cases with fewer arguments (each cffi argument costs ~20 ns, more
 * than the append itself): timestamp now, no headers, wait without limit. */
int64_t shmq_log_append_value(shmq_log *log, const char *value, int64_t value_len);
int64_t shmq_log_append_kv(shmq_log *log, const char *key, int64_t key_len,
                           const char *value, int64_t value_len, int64_t timestamp);
/* Append a batch of records; returns the base offset or an error. */
int64_t shmq_log_append(shmq_log *log, const shmq_records *r, const shmq_batch_meta *meta,
                        int64_t timeout_ns);
/* Append a complete RecordBatch v2 built elsewhere (baseOffset is rewritten;
 * the CRC does not cover it). Returns the base offset or an error. */
int64_t shmq_log_append_raw(shmq_log *log, const uint8_t *batch, int64_t len, int64_t timeout_ns);

/* Log start offset (oldest record still held) and end offset (next offset to
 * be assigned). */
int64_t shmq_log_start_offset(shmq_log *log);
int64_t shmq_log_end_offset(shmq_log *log);

/* Position a cursor at offset (clamped to nothing: an offset below the log
 * start is SHMQ_ERR_OUT_OF_RANGE; at or past the end waits at the end). */
int shmq_log_seek(shmq_log *log, shmq_cursor *cur, int64_t offset);
/* Position a cursor at the first record whose timestamp >= ts; returns that
 * record's offset, or the end offset when there is none. */
int64_t shmq_log_seek_time(shmq_log *log, shmq_cursor *cur, int64_t ts);

/* Copy complete frames from the cursor into dst and decode them into views
 * (positions relative to dst). Stops at the first incomplete frame, when dst
 * or views are full, or at max_records. Checks the slot generation after the
 * copy. Returns the number of records (0 = nothing yet) or an error; on
 * success the cursor moves past what was returned. */
int64_t shmq_log_read(shmq_log *log, shmq_cursor *cur, uint8_t *dst, int64_t dst_len,
                      shmq_record_view *views, int64_t max_records, int check_crc,
                      int64_t *dst_used);

/* Copy the value (field 0) or key (field 1) of n decoded records, all of
 * length width, from buf into out (n * width bytes). Returns 0, or -1 when a
 * record's length differs from width or its bytes fall outside buf (the
 * caller then takes the records one by one). */
int shmq_gather_fixed(const uint8_t *buf, int64_t buf_len, const shmq_record_view *views, int64_t n,
                      int field, int64_t width, uint8_t *out);

/* 1 if a read at the cursor may return something (a complete frame, a
 * segment change, a recycled slot), else 0: a cheap check for spinning. */
int shmq_log_ready(shmq_log *log, const shmq_cursor *cur);

/* Wait until the frame at the cursor may be complete, or timeout_ns passes.
 * Spins for spin_ns first. Returns 1 if something changed, 0 on timeout. */
int shmq_log_wait(shmq_log *log, const shmq_cursor *cur, int64_t spin_ns, int64_t timeout_ns);

/* Mark the log deleted (its topic is going away): later appends in any
 * process fail with SHMQ_ERR_DELETED instead of writing into files that are
 * about to be unlinked. */
void shmq_log_mark_deleted(shmq_log *log);

/* Block mode: report the lowest offset any consumer still needs. */
void shmq_log_set_slowest(shmq_log *log, int64_t offset);

/* Housekeeping: prepare the next slot, finish an abandoned seal, and pad
 * over claims left incomplete past the unblock timeout. Safe to run from any
 * number of processes. Returns the number of frames padded, or an error. */
int64_t shmq_log_housekeep(shmq_log *log, shmq_unblock_state *st);
/* Unblock check for a reader stuck at its cursor (same policy). */
int64_t shmq_log_unblock_cursor(shmq_log *log, const shmq_cursor *cur, shmq_unblock_state *st);

/* futex helpers over a 32-bit word in shared memory. */
int shmq_futex_wait(uint32_t *word, uint32_t expected, int64_t timeout_ns);
int shmq_futex_wake(uint32_t *word, int count);
int64_t shmq_now_ns(void);

#endif
