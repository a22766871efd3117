/*
 * Transaction index of one partition: <root>/txn/<topic>-<partition>, Kafka's
 * .txnindex role plus the partition's last stable offset (LSO) and the open
 * transactions that define it. One file per partition, whatever replica
 * leads it; shmq/ringlog/txn.py maps it and mirrors these constants.
 *
 *   0    +--------------------------------------------------------------+
 *        | magic "SHMQTXI2" | lso (i64) | count (i64) | capacity (i64)    |
 *        | lock (u64)       | reserved ...                              |
 *   64   +--------------------------------------------------------------+
 *        | row 0: producer_id | epoch | first_offset | start_ms (i64 x 4) |
 *        | ... SHMQ_TXN_ROWS rows of 32 bytes                           |
 *   2112 +--------------------------------------------------------------+
 *        | entry 0: producer_id | first_offset | last_offset |          |
 *        |          marker_offset (i64 x 4): an aborted run             |
 *        | ... capacity entries                                         |
 *        +--------------------------------------------------------------+
 *
 *   lso        min first_offset over the open rows, -1 when none is open
 *   count      aborted runs published (entries 0..count-1)
 *   capacity   entries the file has room for
 *   lock       pid of the process changing the rows, 0 free
 *   row        the open transaction of one producer id in this partition:
 *              first_offset -1 = none open (the row keeps the id and epoch
 *              until a new id needs the row: closed rows are reused, the
 *              one used longest ago first); producer_id -1 = a free row
 *
 * Who writes what, with which ordering, and why a reader can trust it:
 *  - rows and lso: anyone appending transactionally (a producer running its
 *    own transaction, the coordinator for the ones it runs or recovers),
 *    only while holding lock (CAS 0 -> pid, acquire; released with a
 *    release store of 0). A holder found dead (kill(pid, 0) == ESRCH) is
 *    taken over by CAS; every change recomputes lso from all rows, so a
 *    change a dead holder left half done is made whole by the next one.
 *    lso is one aligned 8-byte atomic store (release), never torn.
 *  - A row is opened (its first_offset set to the log end, loaded first)
 *    before the transaction's first record is appended, and the append's
 *    fetch-add is a full barrier: a read_committed reader that loads the
 *    high watermark and then lso (acquire) never lets an open
 *    transaction's record through (its first offset is at or above the
 *    high watermark loaded, or lso already covers it).
 *  - A row is closed only after its partition's COMMIT/ABORT marker is
 *    appended, and a producer completing its own commit closes none of
 *    its rows before every partition has its marker: an open row whose
 *    transaction has a COMMIT marker in any partition was committed.
 *  - entries and count: the active coordinator only (it aborts); an entry is
 *    written before count covers it (release) and before the ABORT marker.
 *    The file only grows; the rows region never moves.
 */
#ifndef SHMQ_TXN_INDEX_H
#define SHMQ_TXN_INDEX_H
#include <stdint.h>

#define SHMQ_TXN_HEADER_WORDS 8
#define SHMQ_TXN_W_LSO 1
#define SHMQ_TXN_W_COUNT 2
#define SHMQ_TXN_W_CAPACITY 3
#define SHMQ_TXN_W_LOCK 4
#define SHMQ_TXN_ROWS 64
#define SHMQ_TXN_ROW_WORDS 4
#define SHMQ_TXN_ENTRIES_AT 2112   /* bytes: 64 + SHMQ_TXN_ROWS * 32 */

/* Open the row of producer_id (claiming a free one) at first_offset with
 * start_ms, under the lock. Already open at the same epoch: kept as it is
 * (its first offset is the transaction's). A row of a higher epoch:
 * SHMQ_ERR_PRODUCER_FENCED; open at a lower epoch (an older instance's
 * transaction, which the coordinator must end first): SHMQ_ERR_RETRY. A
 * new producer id takes a free row, else the closed row used longest ago;
 * every row open: SHMQ_ERR_NOSPACE. words: the
 * mapped file from offset 0, at least SHMQ_TXN_ENTRIES_AT bytes. Returns 0
 * or an error (SHMQ_ERR_TIMEOUT: the lock stayed held past timeout_ns). */
int shmq_txn_open_row(int64_t *words, int64_t producer_id, int16_t epoch, int64_t first_offset, int64_t start_ms,
                      int64_t timeout_ns);
/* Fence: raise the row of producer_id (claimed if missing and a row is
 * free) to epoch unless it is open (an older instance's open transaction
 * stays for the coordinator to end); opening it at an older epoch then
 * fails. */
int shmq_txn_fence_row(int64_t *words, int64_t producer_id, int16_t epoch, int64_t timeout_ns);
/* Close the row of producer_id if it is open at an epoch <= max_epoch.
 * Returns 1 closed, 0 none open, or an error. */
int shmq_txn_close_row(int64_t *words, int64_t producer_id, int16_t max_epoch, int64_t timeout_ns);
/* The row of producer_id read under the lock: 1 found (out: epoch,
 * first_offset, start_ms), 0 none. */
int shmq_txn_row(int64_t *words, int64_t producer_id, int64_t out[3], int64_t timeout_ns);
/* Recompute lso from the rows under the lock; returns 0 or an error. */
int shmq_txn_refresh_lso(int64_t *words, int64_t timeout_ns);

#endif
