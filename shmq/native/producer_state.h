/*
 * Idempotent-producer state of one partition log: a fixed-size table in
 * shared memory, <log dir>/producer.state, mapped by every process that
 * appends idempotently (and by the replica process that keeps a follower's
 * copy). Producers append to the log themselves, so this table, not a broker,
 * is the dedup authority: Kafka's "last sequences per producer".
 *
 *   0    +--------------------------------------------------------------+
 *        | magic (u64) | version (u32) | entries (u32) | created_ns (i64) |
 *        | reserved                                                     |
 *   64   +--------------------------------------------------------------+
 *        | entry 0 (64 bytes, one cache line)                           |
 *   128  +--------------------------------------------------------------+
 *        | entry 1 ...                                     (entries of) |
 *        +--------------------------------------------------------------+
 *   file size = 64 + entries * 64 exactly
 *
 * Entry (one line):
 *
 *   0  producer_id     u64  0 = free
 *   8  lock            u64  pid of the process writing the entry, 0 = free
 *  16  seqlock         u64  odd while the lock holder writes the fields below
 *  24  epoch_seq       u64  VALID (bit 63) | epoch u16 << 32 | last_sequence u32
 *  32  first_sequence  i32  base sequence of the last batch (-1: unknown)
 *  36  last_count      u32  records of the last batch (0: unknown)
 *  40  last_base_offset i64 offset of the last batch
 *  48  updated_ms      i64  wall clock of the last update
 *  56  reserved
 *
 * Who writes what, with which ordering, and why a reader can trust it:
 *  - header: written once by shmq_pstate_create, magic last (release); open
 *    checks magic, version and that the file size matches entries, then
 *    keeps its own copy of entries: no index is ever taken from the shared
 *    file afterwards, so scribbled words cannot make anyone read out of
 *    bounds. A zero magic (creation in progress) is SHMQ_ERR_RETRY.
 *  - producer_id: claimed once by CAS 0 -> id (acq_rel) with linear probing
 *    from a hash of the id; never freed except by shmq_pstate_clear (rebuild,
 *    no concurrent appenders). Entries are never moved, so a probe that meets
 *    a 0 word knows the id is absent.
 *  - lock: CAS 0 -> pid (acquire) by the one process about to check and
 *    write the entry (an appender, the follower's observer, a fence), store 0
 *    (release) when done. It makes check + log append + update one atomic
 *    step per producer id (a zombie with an older epoch racing the new owner
 *    is serialised, as Kafka does under its partition lock). A holder found
 *    dead (kill(pid, 0) == ESRCH, or a pid word out of range) is taken over
 *    by CAS; if it died with the seqlock odd, the taker marks the last batch
 *    unknown (first_sequence -1, last_count 0) and makes the seqlock even.
 *    A dead holder can only have been the producer itself, which then never
 *    retries, so a batch it appended but did not record is not duplicated.
 *  - seqlock, epoch_seq, first_sequence, last_count, last_base_offset,
 *    updated_ms: written only by the lock holder: seqlock -> odd, release
 *    fence, fields (relaxed atomics, epoch_seq last), seqlock -> even
 *    (release). The holder reads them directly (its lock acquire ordered it
 *    after the previous holder's release). Lock-free readers (lookup) load
 *    the seqlock (acquire), the fields, an acquire fence and the seqlock
 *    again, and retry until both loads are the same even value.
 *  - epoch_seq alone is always self-consistent (one store): without VALID the
 *    entry has no state yet (claimed, first append in progress) and the id
 *    counts as unknown.
 */
#ifndef SHMQ_PRODUCER_STATE_H
#define SHMQ_PRODUCER_STATE_H
#include <stdint.h>
#include "log.h"

#define SHMQ_PSTATE_MAGIC 0x31544154534D5150
#define SHMQ_PSTATE_VERSION 1
#define SHMQ_PSTATE_HEADER_SIZE 64
#define SHMQ_PSTATE_ENTRY_SIZE 64
#define SHMQ_PSTATE_DEFAULT_ENTRIES 4096
#define SHMQ_PSTATE_MAX_ENTRIES 1048576
#define SHMQ_SEQ_NEXT -1   /* base_seq: the next one after the producer's last (see shmq_pstate_append) */

typedef struct shmq_pstate_header {
    uint64_t magic;
    uint32_t version;
    uint32_t entries;
    int64_t created_ns;
    uint64_t reserved[5];
} shmq_pstate_header;

typedef struct shmq_pstate_entry {
    uint64_t producer_id;
    uint64_t lock;
    uint64_t seqlock;
    uint64_t epoch_seq;
    int32_t first_sequence;
    uint32_t last_count;
    int64_t last_base_offset;
    int64_t updated_ms;
    uint64_t reserved;
} shmq_pstate_entry;

typedef struct shmq_pstate shmq_pstate;

/* Create <dir>/producer.state (O_EXCL, 0600, blocks allocated now) with
 * `entries` entries (1..SHMQ_PSTATE_MAX_ENTRIES, 0 = the default). */
int shmq_pstate_create(const char *dir, uint32_t entries);
/* Map <dir>/producer.state; checks magic, version and size, else
 * SHMQ_ERR_BAD_LAYOUT (SHMQ_ERR_RETRY while its creator has not finished). */
int shmq_pstate_open(const char *dir, shmq_pstate **out);
void shmq_pstate_close(shmq_pstate *ps);
uint32_t shmq_pstate_entries(shmq_pstate *ps);

/* Idempotent append of records r to log, with Kafka's broker-side checks:
 *  - entry epoch > epoch: SHMQ_ERR_PRODUCER_FENCED (nothing appended);
 *  - same epoch, base_seq == first_sequence of the last batch and the same
 *    record count: a retry, nothing appended, *duplicate_out = 1, returns
 *    that batch's base offset;
 *  - same epoch, base_seq <= last_sequence: SHMQ_ERR_DUPLICATE_SEQ;
 *  - same epoch, base_seq != last_sequence + 1 (INT32_MAX wraps to 0):
 *    SHMQ_ERR_OUT_OF_ORDER_SEQ;
 *  - a higher epoch than the entry's needs base_seq 0 (else out of order); an
 *    unknown producer id is accepted at any sequence;
 *  - otherwise shmq_log_append with meta {producer_id, epoch, base_seq, 0, -1}
 *    then the entry is updated. Returns the base offset (>= 0) or an error
 *    (from the log: SHMQ_ERR_NOT_LEADER, SHMQ_ERR_DELETED, SHMQ_ERR_TIMEOUT,
 *    ...; SHMQ_ERR_NOSPACE when the table is full; SHMQ_ERR_ARG for negative
 *    id/epoch/sequence), entry unchanged on error. timeout_ns (< 0: none)
 *    also bounds the wait for the entry lock. duplicate_out may be NULL.
 *  - base_seq SHMQ_SEQ_NEXT: the sequence after the entry's last (0 for an
 *    unknown producer or a newer epoch), chosen under the entry lock: the
 *    table numbers the batches. For logs without replication, where no
 *    append is ever retried (an error means nothing was stored), so every
 *    process and path appending for one producer id (the C send and the
 *    Python one) stays in sequence without sharing a counter. */
int64_t shmq_pstate_append(shmq_pstate *ps, shmq_log *log, const shmq_records *r, int64_t producer_id,
                           int16_t epoch, int32_t base_seq, int64_t timeout_ns, int *duplicate_out);
/* shmq_pstate_append of one record (the send path: no Python-built batch).
 * key_len / value_len -1 = null; headers is one record's encoded header block
 * (headers_len 0: none); timestamp in ms (>= 0). */
int64_t shmq_pstate_append1(shmq_pstate *ps, shmq_log *log, const char *key, int64_t key_len, const char *value,
                            int64_t value_len, const char *headers, int64_t headers_len, int64_t timestamp,
                            int64_t producer_id, int16_t epoch, int32_t base_seq, int64_t timeout_ns,
                            int *duplicate_out);
/* shmq_pstate_append of a complete RecordBatch v2 built elsewhere (a Kafka
 * client's batch arriving through the wire listener): the producer id, epoch,
 * base sequence and record count are read from the batch header, the same
 * checks are made under the entry lock, then shmq_log_append_raw stores the
 * batch as it is (baseOffset rewritten, CRC unaffected). A batch without a
 * producer id (-1) is SHMQ_ERR_ARG: append it with shmq_log_append_raw. */
int64_t shmq_pstate_append_raw(shmq_pstate *ps, shmq_log *log, const uint8_t *batch, int64_t len,
                               int64_t timeout_ns, int *duplicate_out);
/* shmq_pstate_append / append1 writing batch `attributes` (0, or
 * SHMQ_BATCH_ATTR_TRANSACTIONAL for a transactional producer's batches;
 * anything else is SHMQ_ERR_ARG). */
int64_t shmq_pstate_append_attr(shmq_pstate *ps, shmq_log *log, const shmq_records *r, int64_t producer_id,
                                int16_t epoch, int32_t base_seq, int16_t attributes, int64_t timeout_ns,
                                int *duplicate_out);
int64_t shmq_pstate_append1_attr(shmq_pstate *ps, shmq_log *log, const char *key, int64_t key_len,
                                 const char *value, int64_t value_len, const char *headers, int64_t headers_len,
                                 int64_t timestamp, int64_t producer_id, int16_t epoch, int32_t base_seq,
                                 int16_t attributes, int64_t timeout_ns, int *duplicate_out);
/* Fence: raise the entry's epoch to `epoch` without appending (its next
 * batch must then have sequence 0; older epochs get PRODUCER_FENCED).
 * Returns 0, SHMQ_ERR_PRODUCER_FENCED if the entry already has a higher
 * epoch, or an error. */
int shmq_pstate_fence(shmq_pstate *ps, int64_t producer_id, int16_t epoch, int64_t timeout_ns);
/* Follower / rebuild side: walk a raw frame stream (consecutive frames, each
 * an 8-byte little-endian header word: bits 0-31 int32 frame length with the
 * header, a multiple of 8, >= 72, equal to 8 + the batch length rounded up to
 * 8 for data frames; bits 32-61 not interpreted; bits 62-63 type: 0 data, 1
 * padding, 2 fenced (skipped like padding); then the batch or filler) and
 * record every data batch with producerId >= 0, producerEpoch >= 0 and
 * baseSequence >= 0 in the table (later batches overwrite). The whole stream
 * is validated before anything is recorded: bad input -> SHMQ_ERR_CORRUPT
 * and the table unchanged. Returns 0 or < 0 (SHMQ_ERR_NOSPACE when the
 * table is full, SHMQ_ERR_TIMEOUT when an entry stays locked for 1 s). */
int shmq_pstate_observe_frames(shmq_pstate *ps, const uint8_t *buf, int64_t len);
/* Forget everything (the caller then re-observes the whole log from its
 * start). Not to be called while anyone appends through the table. */
void shmq_pstate_clear(shmq_pstate *ps);
/* One producer's entry: 1 found (fields set; any pointer may be NULL), 0 not
 * found (or no state yet). */
int shmq_pstate_lookup(shmq_pstate *ps, int64_t producer_id, int16_t *epoch, int32_t *first_seq,
                       int32_t *last_seq, int64_t *last_offset);

/* A lock word holding its holder's pid (0 free): CAS 0 -> getpid() with
 * acquire, a holder found dead (kill(pid, 0) == ESRCH, or a word out of pid
 * range) taken over by CAS (*took_over = 1: the caller repairs what the
 * dead one left). deadline (shmq_deadline) < 0: wait forever. Returns 0 or
 * SHMQ_ERR_TIMEOUT. The entry locks here and the transaction index's lock
 * (txn_index.h) are this lock. */
int shmq_pid_lock(uint64_t *word, int64_t deadline, int *took_over);
void shmq_pid_unlock(uint64_t *word);
/* Append a control batch (a transaction marker, built elsewhere) for the
 * producer id and epoch in its header, checked under the entry lock like a
 * data batch: an entry of a higher epoch is SHMQ_ERR_PRODUCER_FENCED and
 * nothing is appended. The entry's sequence state is left as it is (a
 * control batch has no sequence). Returns the marker's offset or an error. */
int64_t shmq_pstate_append_control(shmq_pstate *ps, shmq_log *log, const uint8_t *batch, int64_t len,
                                   int64_t timeout_ns);

#endif
