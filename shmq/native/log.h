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
 *        | slowest_offset  groups' committed floor (block mode; MAX none)|
 *        | unblock_owner   pid holding the unblock lock, 0 = free       |
 *        | space_seq (u32 futex word) | space_waiters (u32)             |
 *        | blocked_ns | blocked_count   producers' waits for room         |
 *   256  +--------------------------------------------------------------+
 *        | append_state    0 OPEN, 1 DELETED, 2 NOT_LEADER (appends refused)|
 *   320  +--------------------------------------------------------------+
 *        | replicated | leader_epoch | leader_index | isr_mask          |
 *        | high_watermark (i64) | hw_seq (u32 futex) | hw_waiters (u32) |
 *        | epoch_start_offset (i64)                                     |
 *   384  +--------------------------------------------------------------+
 *        | replica_leo[8]   (epoch & 0xFFFF) << 48 | LEO, per replica   |
 *   448  +--------------------------------------------------------------+
 *        | caught_up_ns[8]  monotonic ns a follower last caught up      |
 *   512  +--------------------------------------------------------------+
 *        | slot 0: claim line (64) | state line (64)                    |
 *        | slot 1 ...                                                   |
 *   512 + 128 * slot_count
 *        +--------------------------------------------------------------+
 *        | reader 0 (64): owner | start_time | position | flags | kind  |
 *        |                missed | label[24]                            |
 *        | reader 1 ... reader SHMQ_MAX_READERS - 1                     |
 *        +--------------------------------------------------------------+
 *
 * Reader table (log_readers.c has the protocol): every live reader of the
 * partition (consumer, LogReader, follower) owns one 64-byte slot and
 * publishes there the next offset it needs. In block mode (the default)
 * a segment is recycled only when every live tethered reader and the
 * groups' committed floor (slowest_offset) are past its end; a producer
 * facing a full ring sleeps on space_seq, which readers bump when they move
 * while space_waiters is non-zero. A slot whose process died (pid and
 * process start time) is freed by whoever notices.
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
 * Replication words (lines 4-7), who writes them and how:
 *   append_state      coordinator / replica process, release store, then
 *                     commit_seq and hw_seq are bumped and woken (waiting
 *                     readers and acks=all waiters notice at once). Every
 *                     producer claim loads it (acquire): 1 -> DELETED,
 *                     2 -> NOT_LEADER. The replication copy ignores it.
 *   replicated, leader_index, isr_mask
 *                     coordinator (release; isr/index before the epoch).
 *   leader_epoch, epoch_start_offset
 *                     coordinator or the leader's replica process, before
 *                     append_state becomes OPEN (so every claim that sees
 *                     OPEN stamps the new epoch into its batch).
 *   replica_leo[r], caught_up_ns[r]
 *                     only follower r (release stores).
 *   high_watermark    anyone, CAS-max only (truncate/reset, single writer,
 *                     may lower it); each change bumps hw_seq (release) and
 *                     wakes hw_waiters and the readers' futex.
 *   When replicated is set, readers never return a frame whose first offset
 *   is >= high_watermark; the replication copy (shmq_log_read_frames)
 *   ignores it.
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
#define SHMQ_LOG_VERSION 3
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

#define SHMQ_APPEND_OPEN 0
#define SHMQ_APPEND_DELETED 1
#define SHMQ_APPEND_NOT_LEADER 2

#define SHMQ_MAX_REPLICAS 8

#define SHMQ_MAX_READERS 64
#define SHMQ_READER_SLOT_SIZE 64
#define SHMQ_READER_TETHERED 1      /* the reader holds producers back (block mode) */
#define SHMQ_READER_KIND_LOG 0      /* a LogReader */
#define SHMQ_READER_KIND_CONSUMER 1 /* a Consumer's reader */
#define SHMQ_READER_KIND_FOLLOWER 2 /* a follower replica copying the leader */

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
#define SHMQ_ERR_READERS_FULL -23   /* every slot of the reader table is held by a live reader */
#define SHMQ_ERR_STORAGE -24        /* a file of the log shrank, vanished or was replaced under this process */

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
    int64_t slowest_offset;     /* groups' committed floor; INT64_MAX: no group holds anything */
    uint32_t unblock_owner;
    uint32_t space_seq;         /* futex word: +1 when a reader moves or leaves while space_waiters != 0 */
    uint32_t space_waiters;     /* producers sleeping for room in a full block-mode ring */
    uint32_t pad3a;
    uint64_t blocked_ns;        /* total time producers waited for room (fetch-add by each waiter) */
    uint64_t blocked_count;     /* waits for room that producers went through */
    uint64_t pad3[3];
    /* line 4: SHMQ_APPEND_OPEN / DELETED (set once by the coordinator when
     * the topic is deleted, before the files are unlinked) / NOT_LEADER (a
     * follower, or a fenced old leader); producer appends fail unless OPEN */
    uint32_t append_state;
    uint32_t pad4a;
    uint64_t pad4[7];
    /* line 5: replication (see "Replication words" above) */
    uint32_t replicated;        /* 1: the log belongs to a partition with replication factor > 1; readers stop at high_watermark */
    uint32_t leader_epoch;      /* epoch this log leads in (stamped into every appended batch when replicated) */
    uint32_t leader_index;      /* replica index (0..SHMQ_MAX_REPLICAS-1) of the leader in the partition's replica list */
    uint32_t isr_mask;          /* bit r set: replica index r is in the ISR */
    int64_t high_watermark;     /* offsets below it are replicated to every ISR member; only grows (CAS max) */
    uint32_t hw_seq;            /* futex word: +1 on every high-watermark change (and on append_state changes) */
    uint32_t hw_waiters;        /* processes sleeping on hw_seq */
    int64_t epoch_start_offset; /* first offset of leader_epoch in this log */
    uint64_t pad5[3];
    /* lines 6-7 */
    uint64_t replica_leo[8];    /* per replica index: (epoch & 0xFFFF) << 48 | log end offset of that follower */
    int64_t caught_up_ns[8];    /* per replica index: CLOCK_MONOTONIC ns when that follower last read to the leader's committed end */
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

/* One reader's slot in the reader table (64 bytes; see log_readers.c). */
typedef struct shmq_reader_slot {
    uint64_t owner;       /* 0 free; pid of the owning process (bit 63 set while it fills the slot) */
    uint64_t start_time;  /* the owner's process start time (/proc/<pid>/stat field 22) */
    int64_t position;     /* next offset the reader needs (owner only, seq_cst) */
    uint32_t flags;       /* SHMQ_READER_TETHERED */
    uint32_t kind;        /* SHMQ_READER_KIND_* */
    int64_t missed;       /* records this reader lost to an overwriting ring (owner only) */
    char label[24];       /* group id, client id or replica name, NUL-padded */
} shmq_reader_slot;

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
    uint32_t reader_id;   /* 0: not in the reader table; else slot index + 1 (reads and seeks publish next_offset there) */
    uint32_t pad;
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
 * than the append itself): no headers; append_value stamps now and waits
 * for room without limit, append_kv waits up to timeout_ns (< 0: no limit). */
int64_t shmq_log_append_value(shmq_log *log, const char *value, int64_t value_len);
int64_t shmq_log_append_kv(shmq_log *log, const char *key, int64_t key_len,
                           const char *value, int64_t value_len, int64_t timestamp, int64_t timeout_ns);
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
/* shmq_log_wait for a follower's cursor: waits for a committed frame and
 * ignores the high watermark (followers copy what is not replicated yet). */
int shmq_log_wait_frames(shmq_log *log, const shmq_cursor *cur, int64_t spin_ns, int64_t timeout_ns);
/* shmq_log_wait_frames for an idle sleeper (a replica process's waiter
 * thread): no spin, and one futex sleep of up to timeout_ns instead of
 * 100 ms slices, so it costs no wake-up while nothing is committed; a waker
 * that died between its commit and its wake delays it up to timeout_ns. */
int shmq_log_sleep_frames(shmq_log *log, const shmq_cursor *cur, int64_t timeout_ns);

/* Mark the log deleted (its topic is going away): later appends in any
 * process fail with SHMQ_ERR_DELETED instead of writing into files that are
 * about to be unlinked. */
void shmq_log_mark_deleted(shmq_log *log);

/* ------------------------------------------------------------ replication
 *
 * Set append_state (SHMQ_APPEND_*), release store; then bump commit_seq and
 * hw_seq and wake both, so waiting readers and acks=all waiters notice. */
void shmq_log_set_append_state(shmq_log *log, uint32_t state);
/* Store replicated, leader_index, isr_mask, then leader_epoch and
 * epoch_start_offset (release stores, in that order). */
void shmq_log_set_replication(shmq_log *log, uint32_t replicated, uint32_t leader_epoch, uint32_t leader_index,
                              uint32_t isr_mask, int64_t epoch_start_offset);

/* Called by follower replica_index on the LEADER's log after copying up to
 * leo into its own log: stores replica_leo[replica_index] (and, if
 * caught_up, caught_up_ns = now), recomputes the high watermark as the
 * minimum LEO over the ISR members other than the leader (an LEO tagged
 * with another epoch counts as 0; never above the leader's end offset; not
 * changed when the ISR holds only the leader), and CAS-maxes it. Returns the
 * high watermark after the call, or SHMQ_ERR_ARG for a bad index. */
int64_t shmq_log_publish_leo(shmq_log *log, uint32_t replica_index, uint32_t epoch, int64_t leo, int caught_up);
/* CAS-max the high watermark to hw (wakes waiters if it grew); returns it. */
int64_t shmq_log_advance_hw(shmq_log *log, int64_t hw);
/* The recomputation of publish_leo without storing an LEO; returns the HW. */
int64_t shmq_log_recompute_hw(shmq_log *log);
/* high_watermark if the log is replicated, else the end offset. */
int64_t shmq_log_high_watermark(shmq_log *log);
/* acks=all: wait until the high watermark is above offset. Returns 1 then,
 * 0 on timeout (timeout_ns < 0: no limit), SHMQ_ERR_NOT_LEADER or
 * SHMQ_ERR_DELETED as soon as append_state says so. Spins for spin_ns, then
 * sleeps on hw_seq. */
int shmq_log_wait_hw(shmq_log *log, int64_t offset, int64_t spin_ns, int64_t timeout_ns);

/* Raw frame stream (replication copy).
 *
 * A sequence of 8-byte aligned frames exactly as they sit in a segment
 * (header word + body), except that each header's 30-bit rel field holds
 * the number of offsets the frame covers instead of a segment-relative
 * number:
 *   data frame     [len | count = lastOffsetDelta + 1 | type 0] RecordBatch v2 + pad
 *                  (the batch's baseOffset is the frame's first offset)
 *   padding frame  [len | count = offsets of the dead claim | type 1] body
 *                  (the body is an empty batch for tools; not relied on)
 * Frames follow each other without gaps: the first offset of a frame is the
 * first offset of the stream plus the counts of the frames before it.
 *
 * shmq_log_read_frames: copy complete committed frames from the cursor into
 * dst as such a stream (no record decode; the high watermark is ignored),
 * checking each data batch's header (and CRC when check_crc) and that its
 * baseOffset is the frame's offset; the cursor moves past what was
 * returned, following seals. Returns the bytes written (0: nothing yet) or
 * an error (SHMQ_ERR_TOO_LARGE when the first frame does not fit dst). */
int64_t shmq_log_read_frames(shmq_log *log, shmq_cursor *cur, uint8_t *dst, int64_t dst_len, int check_crc);
/* Append a raw frame stream keeping its offsets: each frame covers its count
 * of offsets from this log's end offset; a data frame whose baseOffset is not
 * that end is refused with SHMQ_ERR_DIVERGED (frames before it stay
 * appended). Data frames are copied byte for byte (not re-stamped); padding
 * frames become padding frames of the same length and span. Ignores
 * append_state. A malformed stream is SHMQ_ERR_CORRUPT. Single writer.
 * Returns the new end offset. */
int64_t shmq_log_append_frames(shmq_log *log, const uint8_t *buf, int64_t len);
/* Drop every record at or above offset (single writer, no concurrent
 * appenders, readers positioned past offset must seek again): the end
 * becomes the largest frame boundary <= offset. Offset >= end: no-op; below
 * the start: like shmq_log_reset. Lowers high_watermark to the new end.
 * Returns the new end offset. */
int64_t shmq_log_truncate(shmq_log *log, int64_t offset);
/* Drop everything: the log becomes empty with start = end = offset (and
 * high_watermark = offset). Single writer. Returns offset. */
int64_t shmq_log_reset(shmq_log *log, int64_t offset);
/* Walk a raw frame stream: report every data batch whose
 * partitionLeaderEpoch is above the previous one seen (starting from
 * last_epoch), epochs[k] and starts[k] = its baseOffset. Returns the count
 * (<= max) or SHMQ_ERR_CORRUPT. */
int32_t shmq_frames_epochs(const uint8_t *buf, int64_t len, int32_t last_epoch, int32_t *epochs, int64_t *starts,
                           int32_t max);
/* msync(MS_SYNC) what changed since the last flush through this handle
 * (segments up to their claim position, their indexes, the control block).
 * Returns 0 or SHMQ_ERR_IO. */
int shmq_log_flush(shmq_log *log);

/* ------------------------------------------------- files under our feet
 *
 * A file of the log truncated, shrunk, unlinked or replaced while this
 * process has it mapped makes every call on this handle that meets it fail
 * with SHMQ_ERR_STORAGE (a SIGBUS inside the C core is caught and turned
 * into that error; log_guard.c), and the handle stays failed. The name of
 * the first such file ("3.log", "partition.ctl"), or NULL: */
const char *shmq_log_fault_file(shmq_log *log);
/* Compare every file of the log with what was mapped (inode, size) now:
 * SHMQ_OK or SHMQ_ERR_STORAGE. (Guarded calls do it at most once a second.) */
int shmq_log_check_files(shmq_log *log);
/* Read one control-block word under the guard: *out = its value. Returns
 * SHMQ_OK, SHMQ_ERR_ARG for an unknown word, or SHMQ_ERR_STORAGE. */
#define SHMQ_WORD_APPEND_STATE 0
#define SHMQ_WORD_REPLICATED 1
#define SHMQ_WORD_LEADER_EPOCH 2
#define SHMQ_WORD_LEADER_INDEX 3
#define SHMQ_WORD_ISR_MASK 4
#define SHMQ_WORD_EPOCH_START_OFFSET 5
#define SHMQ_WORD_SLOWEST_OFFSET 6
#define SHMQ_WORD_BLOCKED_COUNT 7
#define SHMQ_WORD_BLOCKED_NS 8
#define SHMQ_WORD_REPLICA_LEO 16
#define SHMQ_WORD_CAUGHT_UP_NS 24
int shmq_log_control_word(shmq_log *log, int which, int64_t *out);
/* The doorbell of a wait over several logs (futex_waitv): add delta to the
 * log's waiters count (the waker reads it after its commit, seq_cst; see
 * log_wait.c) and give the commit_seq futex word's address and value.
 * SHMQ_OK or SHMQ_ERR_STORAGE (guarded like every entry point). */
int shmq_log_doorbell(shmq_log *log, int32_t delta, uint32_t **word, uint32_t *val);

/* ------------------------------------------------------- reader table */

/* Block mode: the lowest offset any consumer group still needs (its
 * committed offset); INT64_MAX when no group holds anything. Wakes producers
 * waiting for room. */
void shmq_log_set_slowest(shmq_log *log, int64_t offset);
/* Take a slot of the reader table for cur (cur->reader_id is set) with
 * the given first position, SHMQ_READER_* flags, kind and label (truncated
 * to 23 bytes). Returns the slot index or SHMQ_ERR_READERS_FULL. */
int shmq_log_reader_register(shmq_log *log, shmq_cursor *cur, int64_t position, uint32_t flags, uint32_t kind,
                             const char *label);
/* Give cur's slot back (only from the process that took it). */
void shmq_log_reader_release(shmq_log *log, shmq_cursor *cur);
/* Slot index of the table, or NULL past SHMQ_MAX_READERS. */
shmq_reader_slot *shmq_log_reader_slot(shmq_log *log, uint32_t index);
/* Free the slots of readers whose process died; returns how many. */
int shmq_log_readers_sweep(shmq_log *log);
/* The lowest offset still needed: min of the groups' floor and every live
 * tethered reader's position. *holder: the reader slot that sets it, -1 for
 * the groups' floor, -2 when nothing holds anything (INT64_MAX returned). */
int64_t shmq_log_retention_floor(shmq_log *log, int32_t *holder);

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
/* Wall-clock milliseconds (record timestamps). */
int64_t shmq_wall_ms(void);
/* The shmq_now_ns() deadline timeout_ns from now; -1 (none) for a negative timeout. */
int64_t shmq_deadline(int64_t timeout_ns);

#endif
