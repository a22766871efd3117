/*
 * Kafka RecordBatch v2 (magic 2) encode and decode, CRC32C, murmur2.
 *
 * On-the-wire batch layout (big-endian), 61-byte header then records:
 *
 *   0  int64  baseOffset
 *   8  int32  batchLength          (bytes after this field)
 *  12  int32  partitionLeaderEpoch
 *  16  int8   magic (=2)
 *  17  uint32 crc                  (CRC32C of bytes 21..end)
 *  21  int16  attributes           (bit 4 transactional, bit 5 control)
 *  23  int32  lastOffsetDelta
 *  27  int64  baseTimestamp        (firstTimestamp)
 *  35  int64  maxTimestamp
 *  43  int64  producerId
 *  51  int16  producerEpoch
 *  53  int32  baseSequence
 *  57  int32  recordCount
 *  61  records...
 *
 * Record: varint length, int8 attributes, varlong timestampDelta,
 * varint offsetDelta, varint keyLen (-1 null), key, varint valueLen (-1 null),
 * value, varint headerCount, headers (varint keyLen, key, varint valueLen, value).
 * Varints are zig-zag encoded as in protobuf.
 */
#ifndef SHMQ_RECORD_BATCH_H
#define SHMQ_RECORD_BATCH_H
#include <stdint.h>
#include <stddef.h>

#define SHMQ_BATCH_HEADER_SIZE 61
#define SHMQ_BATCH_OFF_BASE_OFFSET 0
#define SHMQ_BATCH_OFF_LENGTH 8
#define SHMQ_BATCH_OFF_LEADER_EPOCH 12
#define SHMQ_BATCH_OFF_MAGIC 16
#define SHMQ_BATCH_OFF_CRC 17
#define SHMQ_BATCH_OFF_ATTRIBUTES 21
#define SHMQ_BATCH_OFF_LAST_OFFSET_DELTA 23
#define SHMQ_BATCH_OFF_BASE_TIMESTAMP 27
#define SHMQ_BATCH_OFF_MAX_TIMESTAMP 35
#define SHMQ_BATCH_OFF_PRODUCER_ID 43
#define SHMQ_BATCH_OFF_PRODUCER_EPOCH 51
#define SHMQ_BATCH_OFF_BASE_SEQUENCE 53
#define SHMQ_BATCH_OFF_RECORD_COUNT 57

/* Batch attribute bits shmq writes besides the timestamp type. */
#define SHMQ_BATCH_ATTR_TRANSACTIONAL 16
#define SHMQ_BATCH_ATTR_CONTROL 32

/* Error codes shared by the whole C core (negative return values):
 *   SHMQ_ERR_CORRUPT   bytes do not parse / out of bounds
 *   SHMQ_ERR_CRC       CRC32C mismatch
 *   SHMQ_ERR_TOO_LARGE does not fit the destination
 *   SHMQ_ERR_ARG       bad argument from the caller
 * (No comments on the #define lines: build.py exports to Python only plain
 * "#define NAME integer" lines.) */
#define SHMQ_OK 0
#define SHMQ_ERR_CORRUPT -1
#define SHMQ_ERR_CRC -2
#define SHMQ_ERR_TOO_LARGE -3
#define SHMQ_ERR_ARG -4

/*
 * A set of records to encode. Variable-width fields are given as one
 * concatenated buffer plus count+1 int64 offsets (record i is
 * buf[offs[i] .. offs[i+1]]); when offs is NULL, every record has `width`
 * bytes at buf + i*width. A NULL buf means every record has a null field.
 * `*_null` (optional, count bytes) marks individual null keys/values.
 * Headers are passed pre-encoded per record (varint count followed by the
 * header entries exactly as they appear in the record); NULL = no headers.
 * timestamps (optional, count int64) gives per-record timestamps, else all
 * records use base_timestamp.
 */
typedef struct shmq_records {
    uint32_t count;
    const uint8_t *values; const int64_t *value_offs; int64_t value_width; const uint8_t *value_null;
    const uint8_t *keys;   const int64_t *key_offs;   int64_t key_width;   const uint8_t *key_null;
    const uint8_t *headers; const int64_t *header_offs;
    int64_t base_timestamp; const int64_t *timestamps;
} shmq_records;

/* Identity fields of a batch header. */
typedef struct shmq_batch_meta {
    int64_t producer_id;     /* -1 when not idempotent */
    int16_t producer_epoch;  /* -1 */
    int32_t base_sequence;   /* -1 */
    int16_t attributes;      /* 0 unless transactional/control */
    int32_t leader_epoch;    /* partitionLeaderEpoch, -1 if unknown */
} shmq_batch_meta;

/* One decoded record: positions are byte offsets from the start of the batch. */
typedef struct shmq_record_view {
    int64_t offset;
    int64_t timestamp;
    int64_t key_pos;     int64_t key_len;      /* key_len -1 = null */
    int64_t value_pos;   int64_t value_len;    /* value_len -1 = null */
    int64_t headers_pos; int64_t headers_count; /* headers_pos points at the first header entry */
} shmq_record_view;

uint32_t shmq_crc32c(uint32_t crc, const uint8_t *buf, size_t len);  /* crc=0 to start; standard CRC32C (Castagnoli) */
uint32_t shmq_crc32c_portable(uint32_t crc, const uint8_t *buf, size_t len);
int shmq_crc32c_hardware_available(void);

int32_t shmq_murmur2(const uint8_t *key, size_t len);  /* Kafka's Utils.murmur2 */
int32_t shmq_murmur2_partition(const uint8_t *key, size_t len, int32_t num_partitions); /* toPositive(murmur2) % n */

/*
 * Implementation notes (record_batch.c):
 *  - meta may be NULL: producer id/epoch/sequence -1, attributes 0, leader
 *    epoch -1. Compression attribute bits are refused (SHMQ_ERR_ARG); base
 *    offsets must be >= 0. shmq_batch_encode needs count >= 1.
 *  - Pre-encoded headers are copied as given (not validated); an empty
 *    slice (header_offs[i] == header_offs[i+1]) means no headers.
 *  - shmq_batch_check/decode also require lastOffsetDelta >= 0, baseOffset
 *    >= 0, recordCount <= (batch bytes - 61) / 7; decode requires strictly
 *    increasing offset deltas <= lastOffsetDelta, key/value lengths >= -1,
 *    non-null header keys, each record to end exactly at its length and the
 *    last record at the batch end; compressed batches with records are
 *    SHMQ_ERR_CORRUPT. With the LogAppendTime attribute (bit 3) every record
 *    gets maxTimestamp, as in Kafka.
 *  - decode returns as soon as out is full (later records are not looked
 *    at): call again with min_offset = last offset + 1 for the rest.
 */

/* Exact encoded size of a batch holding r (header included); <0 on bad args. */
int64_t shmq_batch_size(const shmq_records *r);
/* Exact encoded size of a one-record batch (fast path). */
int64_t shmq_batch_size1(int64_t key_len, int64_t value_len, int64_t headers_len);

/* Encode r into dst (dst_len >= shmq_batch_size(r)) with baseOffset base_offset;
 * fills in every header field including the CRC. Returns bytes written or <0. */
int64_t shmq_batch_encode(uint8_t *dst, int64_t dst_len, const shmq_records *r,
                          int64_t base_offset, const shmq_batch_meta *meta);
/* One-record fast path: key/value may be NULL with len -1 for null; headers
 * pre-encoded (including the leading varint count) or NULL/0 for none. */
int64_t shmq_batch_encode1(uint8_t *dst, int64_t dst_len, int64_t base_offset, int64_t timestamp,
                           const uint8_t *key, int64_t key_len, const uint8_t *value, int64_t value_len,
                           const uint8_t *headers, int64_t headers_len, const shmq_batch_meta *meta);

/* Validate a batch header in buf (len bytes available): magic 2, batchLength
 * consistent with len, recordCount sane. Returns the total batch size
 * (batchLength + 12) or <0. With check_crc, also verifies the CRC. */
int64_t shmq_batch_check(const uint8_t *buf, int64_t len, int check_crc);

/* Decode records of the batch at buf (already checked). A control batch
 * (attributes bit 5: a transaction marker) decodes to 0 records. Records with
 * offset < min_offset are skipped. Writes at most max_out views; returns the
 * number written or <0 (SHMQ_ERR_CORRUPT) if any varint or length runs past
 * the batch. Every length is bounds-checked: never reads outside buf[0..len). */
int64_t shmq_batch_decode(const uint8_t *buf, int64_t len, int64_t min_offset,
                          shmq_record_view *out, int64_t max_out);

/* Rewrite baseOffset (and nothing covered by the CRC). */
void shmq_batch_set_base_offset(uint8_t *batch, int64_t base_offset);

/* Write a 61-byte header-only batch with zero records covering offsets
 * [base_offset, base_offset+count) (Kafka's empty batch after compaction);
 * used as the body of a padding frame. dst_len >= 61. */
int64_t shmq_batch_encode_empty(uint8_t *dst, int64_t dst_len, int64_t base_offset, int32_t count, int64_t timestamp);

#endif
