/*
 * The open-transaction rows of a partition's transaction index and the LSO
 * they define (layout and ownership rules in txn_index.h). Every change
 * holds the index lock and ends by recomputing the LSO from all rows.
 */
#include "txn_index.h"
#include "producer_state.h"

#define ROW_PID 0
#define ROW_EPOCH 1
#define ROW_FIRST 2
#define ROW_START_MS 3

static int64_t *row_at(int64_t *words, int i)
{
    return words + SHMQ_TXN_HEADER_WORDS + (int64_t)i * SHMQ_TXN_ROW_WORDS;
}

static int64_t ld(const int64_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
static void st(int64_t *p, int64_t v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }

static int lock(int64_t *words, int64_t timeout_ns)
{
    int took_over;
    return shmq_pid_lock((uint64_t *)&words[SHMQ_TXN_W_LOCK], shmq_deadline(timeout_ns), &took_over);
}

/* Under the lock: lso = min first_offset of the open rows (release: a
 * reader that sees it sees the rows behind it), then unlock. */
static int64_t publish_and_unlock(int64_t *words)
{
    int64_t lso = -1;
    for (int i = 0; i < SHMQ_TXN_ROWS; i++) {
        int64_t *r = row_at(words, i);
        int64_t first = ld(&r[ROW_FIRST]);
        if (ld(&r[ROW_PID]) >= 0 && first >= 0 && (lso < 0 || first < lso))
            lso = first;
    }
    __atomic_store_n(&words[SHMQ_TXN_W_LSO], lso, __ATOMIC_RELEASE);
    shmq_pid_unlock((uint64_t *)&words[SHMQ_TXN_W_LOCK]);
    return lso;
}

/* The row of producer_id, or NULL. */
static int64_t *find(int64_t *words, int64_t producer_id)
{
    for (int i = 0; i < SHMQ_TXN_ROWS; i++)
        if (ld(&row_at(words, i)[ROW_PID]) == producer_id)
            return row_at(words, i);
    return NULL;
}

/* A row for producer_id (no row of it exists): a free one, else (evict) the
 * closed row used longest ago; NULL when every row is open (or !evict and
 * none is free). An evicted producer id's zombie may claim a row again
 * later; its records are fenced in the producer-state table and the
 * coordinator ends such a row (txn_index.h). */
static int64_t *claim(int64_t *words, int64_t producer_id, int16_t epoch, int evict)
{
    int64_t *r = NULL;
    for (int i = 0; i < SHMQ_TXN_ROWS && r == NULL; i++)
        if (ld(&row_at(words, i)[ROW_PID]) < 0)
            r = row_at(words, i);
    for (int i = 0; i < SHMQ_TXN_ROWS && r == NULL && evict; i++) {
        int64_t *c = row_at(words, i);
        if (ld(&c[ROW_FIRST]) < 0 && (r == NULL || ld(&c[ROW_START_MS]) < ld(&r[ROW_START_MS])))
            r = c;
    }
    if (r != NULL) {
        st(&r[ROW_FIRST], -1);
        st(&r[ROW_EPOCH], epoch);
        st(&r[ROW_START_MS], 0);
        st(&r[ROW_PID], producer_id);
    }
    return r;
}

int shmq_txn_open_row(int64_t *words, int64_t producer_id, int16_t epoch, int64_t first_offset, int64_t start_ms,
                      int64_t timeout_ns)
{
    if (!words || producer_id < 0 || epoch < 0 || first_offset < 0)
        return SHMQ_ERR_ARG;
    int rc = lock(words, timeout_ns);
    if (rc != SHMQ_OK)
        return rc;
    int64_t *r = find(words, producer_id);
    if (r == NULL && (r = claim(words, producer_id, epoch, 1)) == NULL) {
        publish_and_unlock(words);
        return SHMQ_ERR_NOSPACE;   /* SHMQ_TXN_ROWS transactions open on this partition */
    }
    int64_t have = ld(&r[ROW_EPOCH]);
    if (have > epoch) {
        rc = SHMQ_ERR_PRODUCER_FENCED;
    } else if (have < epoch && ld(&r[ROW_FIRST]) >= 0) {
        rc = SHMQ_ERR_RETRY;   /* an older instance's transaction: the coordinator ends it first */
    } else if (have < epoch || ld(&r[ROW_FIRST]) < 0) {
        st(&r[ROW_EPOCH], epoch);
        st(&r[ROW_START_MS], start_ms);
        st(&r[ROW_FIRST], first_offset);
    }
    publish_and_unlock(words);
    return rc;
}

int shmq_txn_fence_row(int64_t *words, int64_t producer_id, int16_t epoch, int64_t timeout_ns)
{
    if (!words || producer_id < 0 || epoch < 0)
        return SHMQ_ERR_ARG;
    int rc = lock(words, timeout_ns);
    if (rc != SHMQ_OK)
        return rc;
    int64_t *r = find(words, producer_id);
    if (r == NULL)
        r = claim(words, producer_id, epoch, 0);   /* no free row: the producer-state fence suffices */
    if (r != NULL && ld(&r[ROW_FIRST]) < 0 && ld(&r[ROW_EPOCH]) < epoch)
        st(&r[ROW_EPOCH], epoch);
    publish_and_unlock(words);
    return rc;
}

int shmq_txn_close_row(int64_t *words, int64_t producer_id, int16_t max_epoch, int64_t timeout_ns)
{
    if (!words || producer_id < 0)
        return SHMQ_ERR_ARG;
    int rc = lock(words, timeout_ns);
    if (rc != SHMQ_OK)
        return rc;
    int64_t *r = find(words, producer_id);
    int closed = 0;
    if (r != NULL && ld(&r[ROW_FIRST]) >= 0 && ld(&r[ROW_EPOCH]) <= max_epoch) {
        st(&r[ROW_FIRST], -1);
        closed = 1;
    }
    publish_and_unlock(words);
    return closed;
}

int shmq_txn_row(int64_t *words, int64_t producer_id, int64_t out[3], int64_t timeout_ns)
{
    if (!words || !out)
        return SHMQ_ERR_ARG;
    int rc = lock(words, timeout_ns);
    if (rc != SHMQ_OK)
        return rc;
    int64_t *r = find(words, producer_id);
    if (r != NULL) {
        out[0] = ld(&r[ROW_EPOCH]);
        out[1] = ld(&r[ROW_FIRST]);
        out[2] = ld(&r[ROW_START_MS]);
    }
    publish_and_unlock(words);
    return r != NULL;
}

int shmq_txn_refresh_lso(int64_t *words, int64_t timeout_ns)
{
    if (!words)
        return SHMQ_ERR_ARG;
    int rc = lock(words, timeout_ns);
    if (rc != SHMQ_OK)
        return rc;
    publish_and_unlock(words);
    return SHMQ_OK;
}
