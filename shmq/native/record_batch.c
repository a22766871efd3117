/*
 * Kafka RecordBatch v2 (magic 2) encode and decode. See record_batch.h for
 * the layout and the contract of each function.
 *
 * Encoding writes straight into the caller's buffer in one pass (each
 * record's size is computed before it is written, because the record starts
 * with its own length) and computes the CRC once at the end. No allocation.
 *
 * Decoding treats the batch as hostile (another process may have written
 * garbage into shared memory, or may still be writing it): every header
 * field is read once into a local, every varint and every length is checked
 * against the end of the batch before it is used, and no byte outside
 * [buf, buf + len) is ever read. Anything malformed is SHMQ_ERR_CORRUPT.
 */
#include <stdint.h>
#include <stddef.h>
#include <string.h>

#include "record_batch.h"

/* Size of the header fields after batchLength, i.e. the smallest batchLength. */
#define BATCH_OVERHEAD_AFTER_LENGTH (SHMQ_BATCH_HEADER_SIZE - 12)
/* Smallest possible record: length, attributes, timestampDelta, offsetDelta,
 * keyLen, valueLen, headerCount, one byte each. */
#define MIN_RECORD_SIZE 7
#define MAGIC_V2 2
/* Attribute bits (batch level). */
#define ATTR_COMPRESSION_MASK 0x07
#define ATTR_LOG_APPEND_TIME 0x08
#define ATTR_CONTROL SHMQ_BATCH_ATTR_CONTROL

#define INT32_LIMIT ((int64_t)INT32_MAX)

static const shmq_batch_meta default_meta = {
    .producer_id = -1, .producer_epoch = -1, .base_sequence = -1,
    .attributes = 0, .leader_epoch = -1,
};

/* ---- big-endian fixed-width fields (any alignment) ------------------- */

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
#define BE16(x) (x)
#define BE32(x) (x)
#define BE64(x) (x)
#else
#define BE16(x) __builtin_bswap16(x)
#define BE32(x) __builtin_bswap32(x)
#define BE64(x) __builtin_bswap64(x)
#endif

static inline void put_be16(uint8_t *p, uint16_t v) { v = BE16(v); memcpy(p, &v, 2); }
static inline void put_be32(uint8_t *p, uint32_t v) { v = BE32(v); memcpy(p, &v, 4); }
static inline void put_be64(uint8_t *p, uint64_t v) { v = BE64(v); memcpy(p, &v, 8); }
static inline uint16_t get_be16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return BE16(v); }
static inline uint32_t get_be32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return BE32(v); }
static inline uint64_t get_be64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return BE64(v); }

/* ---- zig-zag varints --------------------------------------------------- */

static inline uint64_t zigzag(int64_t v)
{
    return ((uint64_t)v << 1) ^ (0 - ((uint64_t)v >> 63));
}

/* Bytes needed to encode v as a zig-zag varint (1..10). A loop rather than
 * a bit scan: the values here are mostly small, and this is faster for them. */
static inline int64_t varint_size(int64_t v)
{
    uint64_t z = zigzag(v);
    int64_t n = 1;
    while (z >= 0x80) {
        z >>= 7;
        n++;
    }
    return n;
}

static inline uint8_t *put_varint(uint8_t *p, int64_t v)
{
    uint64_t z = zigzag(v);
    while (z >= 0x80) {
        *p++ = (uint8_t)(z | 0x80);
        z >>= 7;
    }
    *p++ = (uint8_t)z;
    return p;
}

/*
 * Read a zig-zag varint of at most max_bytes bytes from [*pp, end) whose raw
 * (still zig-zagged) value must be <= raw_max (UINT32_MAX for Kafka's
 * varint, UINT64_MAX for varlong). Returns 0 and advances *pp, or -1 if the
 * varint runs past end, is too long, or overflows.
 */
static inline int get_varint_n(const uint8_t **pp, const uint8_t *end, int max_bytes,
                               uint64_t raw_max, int64_t *out)
{
    const uint8_t *p = *pp;
    if (p < end) {                      /* one-byte fast path */
        uint8_t b = *p;
        if (!(b & 0x80)) {
            *out = (int64_t)(b >> 1) ^ -(int64_t)(b & 1);
            *pp = p + 1;
            return 0;
        }
    }
    uint64_t z = 0;
    for (int i = 0; i < max_bytes; i++) {
        if (p >= end)
            return -1;
        uint8_t b = *p++;
        if (i == 9 && b > 1)            /* 10th byte carries only bit 63 */
            return -1;
        z |= (uint64_t)(b & 0x7f) << (7 * i);
        if (!(b & 0x80)) {
            if (z > raw_max)
                return -1;
            *pp = p;
            *out = (int64_t)(z >> 1) ^ -(int64_t)(z & 1);
            return 0;
        }
    }
    return -1;
}

/* Kafka varint: int32, at most 5 bytes. */
static inline int get_varint32(const uint8_t **pp, const uint8_t *end, int64_t *out)
{
    return get_varint_n(pp, end, 5, UINT32_MAX, out);
}

/* Kafka varlong: int64, at most 10 bytes. */
static inline int get_varlong(const uint8_t **pp, const uint8_t *end, int64_t *out)
{
    return get_varint_n(pp, end, 10, UINT64_MAX, out);
}

/* ---- encoding ------------------------------------------------------------ */

/* One record's fields, located in the caller's buffers. len -1 = null. */
typedef struct rec_fields {
    const uint8_t *key;     int64_t key_len;
    const uint8_t *value;   int64_t value_len;
    const uint8_t *headers; int64_t headers_len;  /* 0 = no headers */
} rec_fields;

static inline int64_t max0(int64_t v) { return v > 0 ? v : 0; }

/* Size of a record body (everything after its length varint). */
static inline int64_t record_body_size(int64_t ts_delta, int64_t offset_delta, const rec_fields *f)
{
    return 1 + varint_size(ts_delta) + varint_size(offset_delta)
         + varint_size(f->key_len) + max0(f->key_len)
         + varint_size(f->value_len) + max0(f->value_len)
         + (f->headers_len > 0 ? f->headers_len : 1);
}

/* Write one record (length varint included) at p; returns the end. */
static inline uint8_t *write_record(uint8_t *p, int64_t body, int64_t ts_delta,
                                    int64_t offset_delta, const rec_fields *f)
{
    p = put_varint(p, body);
    *p++ = 0;                                   /* record attributes */
    p = put_varint(p, ts_delta);
    p = put_varint(p, offset_delta);
    p = put_varint(p, f->key_len);
    if (f->key_len > 0) {
        memcpy(p, f->key, (size_t)f->key_len);
        p += f->key_len;
    }
    p = put_varint(p, f->value_len);
    if (f->value_len > 0) {
        memcpy(p, f->value, (size_t)f->value_len);
        p += f->value_len;
    }
    if (f->headers_len > 0) {
        memcpy(p, f->headers, (size_t)f->headers_len);
        p += f->headers_len;
    } else {
        *p++ = 0;                               /* header count 0 */
    }
    return p;
}

/* Fill in the 61-byte header of a batch of `total` bytes already holding its
 * records, then its CRC (over bytes 21..total). */
static void finish_batch(uint8_t *dst, int64_t total, int64_t base_offset,
                         const shmq_batch_meta *m, int32_t last_offset_delta,
                         int64_t first_ts, int64_t max_ts, int32_t record_count)
{
    put_be64(dst + SHMQ_BATCH_OFF_BASE_OFFSET, (uint64_t)base_offset);
    put_be32(dst + SHMQ_BATCH_OFF_LENGTH, (uint32_t)(total - 12));
    put_be32(dst + SHMQ_BATCH_OFF_LEADER_EPOCH, (uint32_t)m->leader_epoch);
    dst[SHMQ_BATCH_OFF_MAGIC] = MAGIC_V2;
    put_be16(dst + SHMQ_BATCH_OFF_ATTRIBUTES, (uint16_t)m->attributes);
    put_be32(dst + SHMQ_BATCH_OFF_LAST_OFFSET_DELTA, (uint32_t)last_offset_delta);
    put_be64(dst + SHMQ_BATCH_OFF_BASE_TIMESTAMP, (uint64_t)first_ts);
    put_be64(dst + SHMQ_BATCH_OFF_MAX_TIMESTAMP, (uint64_t)max_ts);
    put_be64(dst + SHMQ_BATCH_OFF_PRODUCER_ID, (uint64_t)m->producer_id);
    put_be16(dst + SHMQ_BATCH_OFF_PRODUCER_EPOCH, (uint16_t)m->producer_epoch);
    put_be32(dst + SHMQ_BATCH_OFF_BASE_SEQUENCE, (uint32_t)m->base_sequence);
    put_be32(dst + SHMQ_BATCH_OFF_RECORD_COUNT, (uint32_t)record_count);
    uint32_t crc = shmq_crc32c(0, dst + SHMQ_BATCH_OFF_ATTRIBUTES,
                               (size_t)(total - SHMQ_BATCH_OFF_ATTRIBUTES));
    put_be32(dst + SHMQ_BATCH_OFF_CRC, crc);
}

/* Batch-level attributes we can write: anything but compression. */
static inline int meta_ok(const shmq_batch_meta *m)
{
    return (m->attributes & ATTR_COMPRESSION_MASK) == 0;
}

/* Locate field i of one column (values or keys); see shmq_records. */
static inline int column_field(const uint8_t *buf, const int64_t *offs, int64_t width,
                               const uint8_t *nulls, uint32_t i,
                               const uint8_t **ptr, int64_t *len)
{
    if (buf == NULL || (nulls != NULL && nulls[i])) {
        *ptr = NULL;
        *len = -1;
        return 0;
    }
    if (offs != NULL) {
        int64_t a = offs[i], b = offs[i + 1];
        if (a < 0 || b < a || b - a > INT32_LIMIT)
            return SHMQ_ERR_ARG;
        *ptr = buf + a;
        *len = b - a;
    } else {
        if (width < 0 || width > INT32_LIMIT)
            return SHMQ_ERR_ARG;
        *ptr = buf + (int64_t)i * width;
        *len = width;
    }
    return 0;
}

/* All fields of record i of r. */
static inline int record_fields(const shmq_records *r, uint32_t i, rec_fields *f)
{
    int rc = column_field(r->values, r->value_offs, r->value_width, r->value_null, i,
                          &f->value, &f->value_len);
    if (rc == 0)
        rc = column_field(r->keys, r->key_offs, r->key_width, r->key_null, i,
                          &f->key, &f->key_len);
    if (rc != 0)
        return rc;
    f->headers = NULL;
    f->headers_len = 0;
    if (r->headers != NULL) {
        int64_t a = r->header_offs[i], b = r->header_offs[i + 1];
        if (a < 0 || b < a || b - a > INT32_LIMIT)
            return SHMQ_ERR_ARG;
        f->headers = r->headers + a;
        f->headers_len = b - a;
    }
    return 0;
}

/* Arguments common to shmq_batch_size and shmq_batch_encode. */
static inline int records_ok(const shmq_records *r)
{
    if (r == NULL || r->count == 0 || r->count > (uint32_t)INT32_MAX)
        return 0;
    if (r->headers != NULL && r->header_offs == NULL)
        return 0;
    return 1;
}

static inline int64_t record_timestamp(const shmq_records *r, uint32_t i)
{
    return r->timestamps != NULL ? r->timestamps[i] : r->base_timestamp;
}

/* Wrapping difference a - b (a timestamp delta), without signed overflow. */
static inline int64_t ts_sub(int64_t a, int64_t b)
{
    return (int64_t)((uint64_t)a - (uint64_t)b);
}

int64_t shmq_batch_size(const shmq_records *r)
{
    if (!records_ok(r))
        return SHMQ_ERR_ARG;
    int64_t first_ts = record_timestamp(r, 0);
    int64_t total = SHMQ_BATCH_HEADER_SIZE;
    for (uint32_t i = 0; i < r->count; i++) {
        rec_fields f;
        int rc = record_fields(r, i, &f);
        if (rc != 0)
            return rc;
        int64_t body = record_body_size(ts_sub(record_timestamp(r, i), first_ts), i, &f);
        total += varint_size(body) + body;
        if (total - 12 > INT32_LIMIT)
            return SHMQ_ERR_TOO_LARGE;
    }
    return total;
}

int64_t shmq_batch_encode(uint8_t *dst, int64_t dst_len, const shmq_records *r,
                          int64_t base_offset, const shmq_batch_meta *meta)
{
    if (meta == NULL)
        meta = &default_meta;
    if (!records_ok(r) || !meta_ok(meta) || base_offset < 0 ||
        base_offset > INT64_MAX - (int64_t)(r->count - 1))
        return SHMQ_ERR_ARG;
    if (dst == NULL || dst_len < SHMQ_BATCH_HEADER_SIZE)
        return SHMQ_ERR_TOO_LARGE;

    int64_t first_ts = record_timestamp(r, 0), max_ts = first_ts;
    uint8_t *p = dst + SHMQ_BATCH_HEADER_SIZE;
    for (uint32_t i = 0; i < r->count; i++) {
        rec_fields f;
        int rc = record_fields(r, i, &f);
        if (rc != 0)
            return rc;
        int64_t ts = record_timestamp(r, i);
        if (ts > max_ts)
            max_ts = ts;
        int64_t ts_delta = ts_sub(ts, first_ts);
        int64_t body = record_body_size(ts_delta, i, &f);
        int64_t need = varint_size(body) + body;
        int64_t used = p - dst;
        if (need > dst_len - used)
            return SHMQ_ERR_TOO_LARGE;
        if (used + need - 12 > INT32_LIMIT)
            return SHMQ_ERR_TOO_LARGE;
        p = write_record(p, body, ts_delta, i, &f);
    }
    int64_t total = p - dst;
    finish_batch(dst, total, base_offset, meta, (int32_t)(r->count - 1), first_ts, max_ts,
                 (int32_t)r->count);
    return total;
}

/* Body size of the single record of shmq_batch_encode1, or <0 on bad args. */
static inline int64_t body_size1(int64_t key_len, int64_t value_len, int64_t headers_len)
{
    if (key_len < -1 || value_len < -1 || headers_len < 0)
        return SHMQ_ERR_ARG;
    if (key_len > INT32_LIMIT || value_len > INT32_LIMIT || headers_len > INT32_LIMIT)
        return SHMQ_ERR_TOO_LARGE;
    rec_fields f = { NULL, key_len, NULL, value_len, NULL, headers_len };
    int64_t body = record_body_size(0, 0, &f);
    if (body + 5 + BATCH_OVERHEAD_AFTER_LENGTH > INT32_LIMIT)
        return SHMQ_ERR_TOO_LARGE;
    return body;
}

int64_t shmq_batch_size1(int64_t key_len, int64_t value_len, int64_t headers_len)
{
    int64_t body = body_size1(key_len, value_len, headers_len);
    if (body < 0)
        return body;
    return SHMQ_BATCH_HEADER_SIZE + varint_size(body) + body;
}

int64_t shmq_batch_encode1(uint8_t *dst, int64_t dst_len, int64_t base_offset, int64_t timestamp,
                           const uint8_t *key, int64_t key_len, const uint8_t *value, int64_t value_len,
                           const uint8_t *headers, int64_t headers_len, const shmq_batch_meta *meta)
{
    if (meta == NULL)
        meta = &default_meta;
    if (!meta_ok(meta) || base_offset < 0 ||
        (key == NULL && key_len > 0) || (value == NULL && value_len > 0) ||
        (headers == NULL && headers_len > 0))
        return SHMQ_ERR_ARG;
    int64_t body = body_size1(key_len, value_len, headers_len);
    if (body < 0)
        return body;
    int64_t total = SHMQ_BATCH_HEADER_SIZE + varint_size(body) + body;
    if (dst == NULL || total > dst_len)
        return SHMQ_ERR_TOO_LARGE;

    rec_fields f = { key, key_len, value, value_len, headers, headers_len };
    write_record(dst + SHMQ_BATCH_HEADER_SIZE, body, 0, 0, &f);
    finish_batch(dst, total, base_offset, meta, 0, timestamp, timestamp, 1);
    return total;
}

int64_t shmq_batch_encode_empty(uint8_t *dst, int64_t dst_len, int64_t base_offset, int32_t count,
                                int64_t timestamp)
{
    if (count < 1 || base_offset < 0 || base_offset > INT64_MAX - (count - 1))
        return SHMQ_ERR_ARG;
    if (dst == NULL || dst_len < SHMQ_BATCH_HEADER_SIZE)
        return SHMQ_ERR_TOO_LARGE;
    finish_batch(dst, SHMQ_BATCH_HEADER_SIZE, base_offset, &default_meta, count - 1,
                 timestamp, timestamp, 0);
    return SHMQ_BATCH_HEADER_SIZE;
}

void shmq_batch_set_base_offset(uint8_t *batch, int64_t base_offset)
{
    put_be64(batch + SHMQ_BATCH_OFF_BASE_OFFSET, (uint64_t)base_offset);
}

/* ---- checking and decoding ------------------------------------------------ */

/* Header fields, each read exactly once from the (possibly shared) buffer. */
typedef struct batch_header {
    int64_t size;              /* batchLength + 12 */
    int64_t base_offset;
    int64_t first_ts;
    int64_t max_ts;
    int32_t last_offset_delta;
    int32_t record_count;
    int16_t attributes;
} batch_header;

/*
 * Read and validate the header: magic 2, batchLength >= 49 and within len,
 * lastOffsetDelta >= 0, 0 <= recordCount <= lastOffsetDelta + 1, recordCount
 * small enough for the bytes present (7 bytes per record at least),
 * baseOffset >= 0 and baseOffset + lastOffsetDelta without overflow.
 */
static int read_header(const uint8_t *buf, int64_t len, batch_header *h)
{
    if (buf == NULL || len < SHMQ_BATCH_HEADER_SIZE)
        return SHMQ_ERR_CORRUPT;
    if (buf[SHMQ_BATCH_OFF_MAGIC] != MAGIC_V2)
        return SHMQ_ERR_CORRUPT;
    int32_t batch_length = (int32_t)get_be32(buf + SHMQ_BATCH_OFF_LENGTH);
    if (batch_length < BATCH_OVERHEAD_AFTER_LENGTH || (int64_t)batch_length + 12 > len)
        return SHMQ_ERR_CORRUPT;
    h->size = (int64_t)batch_length + 12;
    h->base_offset = (int64_t)get_be64(buf + SHMQ_BATCH_OFF_BASE_OFFSET);
    h->last_offset_delta = (int32_t)get_be32(buf + SHMQ_BATCH_OFF_LAST_OFFSET_DELTA);
    h->record_count = (int32_t)get_be32(buf + SHMQ_BATCH_OFF_RECORD_COUNT);
    h->attributes = (int16_t)get_be16(buf + SHMQ_BATCH_OFF_ATTRIBUTES);
    h->first_ts = (int64_t)get_be64(buf + SHMQ_BATCH_OFF_BASE_TIMESTAMP);
    h->max_ts = (int64_t)get_be64(buf + SHMQ_BATCH_OFF_MAX_TIMESTAMP);
    if (h->last_offset_delta < 0 || h->record_count < 0 ||
        (int64_t)h->record_count > (int64_t)h->last_offset_delta + 1 ||
        (int64_t)h->record_count > (h->size - SHMQ_BATCH_HEADER_SIZE) / MIN_RECORD_SIZE)
        return SHMQ_ERR_CORRUPT;
    if (h->base_offset < 0 || h->base_offset > INT64_MAX - h->last_offset_delta)
        return SHMQ_ERR_CORRUPT;
    return SHMQ_OK;
}

int64_t shmq_batch_check(const uint8_t *buf, int64_t len, int check_crc)
{
    batch_header h;
    int rc = read_header(buf, len, &h);
    if (rc != SHMQ_OK)
        return rc;
    if (check_crc) {
        uint32_t stored = get_be32(buf + SHMQ_BATCH_OFF_CRC);
        uint32_t crc = shmq_crc32c(0, buf + SHMQ_BATCH_OFF_ATTRIBUTES,
                                   (size_t)(h.size - SHMQ_BATCH_OFF_ATTRIBUTES));
        if (crc != stored)
            return SHMQ_ERR_CRC;
    }
    return h.size;
}

/* Read one varint length field: -1 (null) or 0..(end - *pp) bytes that follow;
 * advances *pp past the varint and the bytes. Returns 0 or -1. */
static inline int get_bytes(const uint8_t **pp, const uint8_t *end, int allow_null,
                            int64_t *pos_out, int64_t *len_out, const uint8_t *base)
{
    int64_t n;
    if (get_varint32(pp, end, &n) != 0)
        return -1;
    if (n < (allow_null ? -1 : 0) || n > end - *pp)
        return -1;
    *pos_out = *pp - base;
    *len_out = n;
    if (n > 0)
        *pp += n;
    return 0;
}

int64_t shmq_batch_decode(const uint8_t *buf, int64_t len, int64_t min_offset,
                          shmq_record_view *out, int64_t max_out)
{
    if (max_out < 0 || (out == NULL && max_out > 0))
        return SHMQ_ERR_ARG;
    batch_header h;
    int rc = read_header(buf, len, &h);
    if (rc != SHMQ_OK)
        return rc;
    /* Compressed record data is not supported (shmq never writes it). */
    if ((h.attributes & ATTR_COMPRESSION_MASK) != 0 && h.record_count > 0)
        return SHMQ_ERR_CORRUPT;
    /* A control batch (a transaction marker) holds no user records: no read
     * path ever returns it as records, as no Kafka consumer does. */
    if (h.attributes & ATTR_CONTROL)
        return 0;
    int log_append_time = (h.attributes & ATTR_LOG_APPEND_TIME) != 0;

    const uint8_t *p = buf + SHMQ_BATCH_HEADER_SIZE;
    const uint8_t *end = buf + h.size;
    int64_t written = 0;
    int64_t prev_delta = -1;

    for (int32_t i = 0; i < h.record_count; i++) {
        /* Offsets strictly increase, so once one record was written every
         * later one qualifies: stop when out is full. */
        if (written == max_out)
            return written;

        int64_t rec_len, ts_delta, offset_delta, hcount, unused_pos, hlen;
        shmq_record_view v;

        if (get_varint32(&p, end, &rec_len) != 0 || rec_len < 0 || rec_len > end - p)
            return SHMQ_ERR_CORRUPT;
        const uint8_t *rend = p + rec_len;
        if (p >= rend)
            return SHMQ_ERR_CORRUPT;
        p++;                                        /* record attributes */
        if (get_varlong(&p, rend, &ts_delta) != 0 ||
            get_varint32(&p, rend, &offset_delta) != 0)
            return SHMQ_ERR_CORRUPT;
        if (offset_delta <= prev_delta || offset_delta > h.last_offset_delta)
            return SHMQ_ERR_CORRUPT;
        prev_delta = offset_delta;
        if (get_bytes(&p, rend, 1, &v.key_pos, &v.key_len, buf) != 0 ||
            get_bytes(&p, rend, 1, &v.value_pos, &v.value_len, buf) != 0)
            return SHMQ_ERR_CORRUPT;
        /* Headers: a non-null string key and a nullable value each, at
         * least two bytes per header. */
        if (get_varint32(&p, rend, &hcount) != 0 || hcount < 0 || hcount > (rend - p) / 2)
            return SHMQ_ERR_CORRUPT;
        v.headers_pos = p - buf;
        v.headers_count = hcount;
        for (int64_t j = 0; j < hcount; j++) {
            if (get_bytes(&p, rend, 0, &unused_pos, &hlen, buf) != 0 ||
                get_bytes(&p, rend, 1, &unused_pos, &hlen, buf) != 0)
                return SHMQ_ERR_CORRUPT;
        }
        if (p != rend)
            return SHMQ_ERR_CORRUPT;

        v.offset = h.base_offset + offset_delta;
        v.timestamp = log_append_time ? h.max_ts
                                      : (int64_t)((uint64_t)h.first_ts + (uint64_t)ts_delta);
        if (v.offset >= min_offset)
            out[written++] = v;
    }
    if (p != end)                                   /* bytes after the last record */
        return SHMQ_ERR_CORRUPT;
    return written;
}
