/*
 * MurmurHash2 exactly as Kafka's Java client (org.apache.kafka.common.utils.
 * Utils.murmur2), so that keyed records land on the partition Kafka would
 * choose. Java works on signed 32-bit ints with wrapping arithmetic and
 * unsigned shifts (>>>); here the same is done on uint32_t, which gives the
 * identical bit pattern without signed-overflow undefined behaviour. Bytes
 * are masked with 0xff as in Java, so a byte >= 0x80 contributes its
 * unsigned value, and the length enters the seed as a Java int.
 */
#include <stdint.h>
#include <stddef.h>

#include "record_batch.h"

int32_t shmq_murmur2(const uint8_t *key, size_t len)
{
    const uint32_t seed = 0x9747b28cu;
    const uint32_t m = 0x5bd1e995u;
    const int r = 24;
    uint32_t h = seed ^ (uint32_t)len;
    size_t len4 = len / 4;

    for (size_t i = 0; i < len4; i++) {
        const uint8_t *p = key + i * 4;
        uint32_t k = (uint32_t)p[0] | ((uint32_t)p[1] << 8) |
                     ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
        k *= m;
        k ^= k >> r;
        k *= m;
        h *= m;
        h ^= k;
    }

    const uint8_t *tail = key + (len & ~(size_t)3);
    switch (len % 4) {
    case 3:
        h ^= (uint32_t)tail[2] << 16;
        /* fall through */
    case 2:
        h ^= (uint32_t)tail[1] << 8;
        /* fall through */
    case 1:
        h ^= (uint32_t)tail[0];
        h *= m;
    }

    h ^= h >> 13;
    h *= m;
    h ^= h >> 15;
    return (int32_t)h;
}

/* Kafka's default partitioner for keyed records:
 * Utils.toPositive(murmur2(key)) % numPartitions. SHMQ_ERR_ARG if n <= 0. */
int32_t shmq_murmur2_partition(const uint8_t *key, size_t len, int32_t num_partitions)
{
    if (num_partitions <= 0)
        return SHMQ_ERR_ARG;
    return (int32_t)(((uint32_t)shmq_murmur2(key, len) & 0x7fffffffu) % (uint32_t)num_partitions);
}
