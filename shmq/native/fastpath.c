/*
 * The per-record front door: a CPython C-API extension (METH_FASTCALL) over
 * the same C core that cffi binds. It carries only the hot path:
 *
 *   Partitioner        Kafka's placements (murmur2 as the Java client, sticky
 *                      or round-robin for null keys); shared by both paths.
 *   Producer.send      the common case in one C call: route lookup, partition,
 *                      timestamp, header encoding, shmq_log_append1 (batch
 *                      build, CRC, claim, commit) and the RecordMetadata.
 *   FastConsumer       poll / consume / commit of the common case.
 *   read_arrays,       the numpy bulk path (LogReader.read_arrays,
 *   append_fixed       Producer.send_batch of a 2-D uint8 array): one call each.
 *
 * Everything else calls back into Python: the fallback (the Python send)
 * for every case this file does not handle, and PartitionLog._fail for every
 * C status code, so error texts live in one place (shmq/native/__init__.py).
 *
 * Only the public API of log.h and record_batch.h is used: this file does
 * not know how the core is split into files.
 *
 * Lifetime: a route holds the PartitionLog objects whose shmq_log handles it
 * caches, so a handle stays mapped while a route can use it; close() drops
 * every route before the owner closes its logs.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "log.h"
#include "record_batch.h"
#include "producer_state.h"
#include "txn_index.h"

#define HEADERS_STACK 1024

#if PY_VERSION_HEX < 0x030A0000   /* Python 3.9 */
static inline PyObject *compat_new_ref(PyObject *o)
{
    Py_INCREF(o);
    return o;
}
#define Py_NewRef(o) compat_new_ref((PyObject *)(o))
static int PyModule_AddObjectRef(PyObject *m, const char *name, PyObject *o)
{
    Py_INCREF(o);
    if (PyModule_AddObject(m, name, o) < 0) {
        Py_DECREF(o);
        return -1;
    }
    return 0;
}
#endif

static PyObject *s_partition, *s_headers, *s_timestamp_ms, *s_value, *s_key;

/* ------------------------------------------------------------ helpers */

static inline uint8_t *put_varint(uint8_t *p, int64_t v)
{
    uint64_t z = ((uint64_t)v << 1) ^ (uint64_t)(v >> 63);
    while (z > 0x7F) {
        *p++ = (uint8_t)((z & 0x7F) | 0x80);
        z >>= 7;
    }
    *p++ = (uint8_t)z;
    return p;
}

/* Kafka's record-header block (varint count, then per header varint key
 * length, UTF-8 key, varint value length or -1, value) of a list or tuple of
 * (str, bytes | None) pairs, into buf. Returns its length, or -1 for
 * anything else (no exception set: the caller hands the case to Python,
 * which raises the error the Python path raises). */
static Py_ssize_t encode_headers(PyObject *headers, uint8_t *buf, Py_ssize_t cap)
{
    if (!PyList_CheckExact(headers) && !PyTuple_CheckExact(headers))
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(headers);
    PyObject **items = PySequence_Fast_ITEMS(headers);
    uint8_t *p = buf, *end = buf + cap;
    if (n == 0)
        return 0;
    p = put_varint(p, n);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *h = items[i];
        if (!PyTuple_CheckExact(h) || PyTuple_GET_SIZE(h) != 2)
            return -1;
        PyObject *k = PyTuple_GET_ITEM(h, 0), *v = PyTuple_GET_ITEM(h, 1);
        if (!PyUnicode_CheckExact(k) || (v != Py_None && !PyBytes_CheckExact(v)))
            return -1;
        Py_ssize_t klen;
        const char *kb = PyUnicode_AsUTF8AndSize(k, &klen);
        if (kb == NULL) {
            PyErr_Clear();
            return -1;
        }
        Py_ssize_t vlen = v == Py_None ? -1 : PyBytes_GET_SIZE(v);
        if (end - p < 20 + klen + (vlen > 0 ? vlen : 0))
            return -1;
        p = put_varint(p, klen);
        memcpy(p, kb, (size_t)klen);
        p += klen;
        p = put_varint(p, vlen);
        if (vlen > 0) {
            memcpy(p, PyBytes_AS_STRING(v), (size_t)vlen);
            p += vlen;
        }
    }
    return p - buf;
}

/* A tuple-subclass instance (namedtuple) of type tp with n stolen items,
 * built as tuple.__new__(tp, items) does, without the intermediate tuple. */
static PyObject *new_named(PyTypeObject *tp, Py_ssize_t n, PyObject **items)
{
    PyObject *o = tp->tp_alloc(tp, n);
    if (o == NULL) {
        for (Py_ssize_t i = 0; i < n; i++)
            Py_XDECREF(items[i]);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (items[i] == NULL) {     /* an item failed to build */
            for (Py_ssize_t j = i + 1; j < n; j++)
                Py_XDECREF(items[j]);
            Py_DECREF(o);
            return NULL;
        }
        PyTuple_SET_ITEM(o, i, items[i]);
    }
    return o;
}

/* Raise through log._fail(rc, what) (the Python error path); returns NULL. */
static PyObject *fail_via(PyObject *plog, int64_t rc, const char *what)
{
    PyObject *r = PyObject_CallMethod(plog, "_fail", "Ls", (long long)rc, what);
    if (r != NULL) {   /* _fail always raises; be safe if it did not */
        Py_DECREF(r);
        PyErr_Format(PyExc_RuntimeError, "%s: C status %lld", what, (long long)rc);
    }
    return NULL;
}

static int as_handle(PyObject *o, void **out)
{
    unsigned long long v = PyLong_AsUnsignedLongLong(o);
    if (v == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    if (v == 0) {
        PyErr_SetString(PyExc_ValueError, "a NULL log handle");
        return -1;
    }
    *out = (void *)(uintptr_t)v;
    return 0;
}

/* A method of an object made with __new__ whose __init__ never succeeded. */
static PyObject *not_ready(void *self)
{
    PyErr_Format(PyExc_TypeError, "%s object is not initialized (its __init__ did not succeed)",
                 Py_TYPE((PyObject *)self)->tp_name);
    return NULL;
}

/* --------------------------------------------------------- Partitioner */

enum { PART_MURMUR2_RANDOM, PART_MURMUR2, PART_XXHASH, PART_ROUNDROBIN };

typedef struct {
    PyObject_HEAD
    int kind;
    int64_t sticky_records;
    int64_t sticky_left;
    int64_t sticky;
    uint64_t rr;
    PyObject *randrange;   /* random.randrange: the sticky choice, as the Python path makes it */
    PyObject *hash;        /* xxhash.xxh64_intdigest for PART_XXHASH */
} Partitioner;

static PyTypeObject PartitionerType;

/* Partition for key (NULL: null key) among n. -1 with an exception set on error. */
static int64_t choose(Partitioner *p, PyObject *key, int64_t n)
{
    if (n <= 0) {
        PyErr_Format(PyExc_ValueError, "a topic needs at least one partition, got %lld", (long long)n);
        return -1;
    }
    if (key != NULL && p->kind != PART_ROUNDROBIN) {
        if (p->kind == PART_XXHASH) {
            PyObject *h = PyObject_CallOneArg(p->hash, key);
            if (h == NULL)
                return -1;
            unsigned long long v = PyLong_AsUnsignedLongLong(h);
            Py_DECREF(h);
            if (v == (unsigned long long)-1 && PyErr_Occurred())
                return -1;
            return (int64_t)(v % (unsigned long long)n);
        }
        Py_buffer b;
        if (PyBytes_CheckExact(key))
            return shmq_murmur2_partition((const uint8_t *)PyBytes_AS_STRING(key), (size_t)PyBytes_GET_SIZE(key),
                                          (int32_t)n);
        if (PyObject_GetBuffer(key, &b, PyBUF_SIMPLE) < 0)
            return -1;
        int32_t r = shmq_murmur2_partition(b.buf, (size_t)b.len, (int32_t)n);
        PyBuffer_Release(&b);
        return r;
    }
    if (p->kind != PART_MURMUR2_RANDOM)
        return (int64_t)(++p->rr % (uint64_t)n);
    if (p->sticky_left <= 0 || p->sticky >= n) {
        PyObject *r = PyObject_CallFunction(p->randrange, "L", (long long)n);
        if (r == NULL)
            return -1;
        long long v = PyLong_AsLongLong(r);
        Py_DECREF(r);
        if (v == -1 && PyErr_Occurred())
            return -1;
        p->sticky = v;
        p->sticky_left = p->sticky_records;
    }
    p->sticky_left--;
    return p->sticky;
}

static int Partitioner_init(Partitioner *self, PyObject *args, PyObject *kw)
{
    static char *names[] = { "kind", "sticky_records", "randrange", "hash", NULL };
    int kind;
    long long sticky;
    PyObject *rr, *hash;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iLOO", names, &kind, &sticky, &rr, &hash))
        return -1;
    if (kind < PART_MURMUR2_RANDOM || kind > PART_ROUNDROBIN || sticky <= 0) {
        PyErr_SetString(PyExc_ValueError, "bad partitioner kind or sticky_records");
        return -1;
    }
    self->kind = kind;
    self->sticky_records = sticky;
    self->sticky_left = 0;
    self->sticky = 0;
    self->rr = 0;
    Py_XSETREF(self->randrange, Py_NewRef(rr));
    Py_XSETREF(self->hash, Py_NewRef(hash));
    return 0;
}

static PyObject *Partitioner_call(Partitioner *self, PyObject *args, PyObject *kw)
{
    PyObject *key;
    long long n;
    if (self->randrange == NULL || self->hash == NULL)
        return not_ready(self);
    if (kw != NULL || !PyArg_ParseTuple(args, "OL", &key, &n))
        return kw != NULL ? PyErr_Format(PyExc_TypeError, "a partitioner takes (key, n)") : NULL;
    int64_t p = choose(self, key == Py_None ? NULL : key, n);
    return p < 0 ? NULL : PyLong_FromLongLong(p);
}

static int Partitioner_traverse(Partitioner *self, visitproc visit, void *arg)
{
    Py_VISIT(self->randrange);
    Py_VISIT(self->hash);
    return 0;
}

static int Partitioner_clear(Partitioner *self)
{
    Py_CLEAR(self->randrange);
    Py_CLEAR(self->hash);
    return 0;
}

static void Partitioner_dealloc(Partitioner *self)
{
    PyObject_GC_UnTrack(self);
    Partitioner_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyTypeObject PartitionerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmq.native._fastpath.Partitioner",
    .tp_doc = "Partitioner(kind, sticky_records, randrange, hash): Kafka's placements, in C",
    .tp_basicsize = sizeof(Partitioner),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Partitioner_init,
    .tp_call = (ternaryfunc)Partitioner_call,
    .tp_traverse = (traverseproc)Partitioner_traverse,
    .tp_clear = (inquiry)Partitioner_clear,
    .tp_dealloc = (destructor)Partitioner_dealloc,
};

/* ----------------------------------------------------------- producer */

/* One topic as the fast send sees it. Immutable once built, but for rows.
 *
 * A transactional producer's route (built only while a transaction is open)
 * also has each partition's producer-state table, NULL for a partition the
 * Python send must add to the transaction (it then drops the routes), and
 * the producer id, epoch and batch attributes: its records go through
 * shmq_pstate_append1_attr with SHMQ_SEQ_NEXT (the table numbers them;
 * unreplicated logs only, where no append is retried), so fencing is
 * checked under the entry lock exactly as on the Python path.
 *
 * rows[p], for a partition the transactional id added before but not yet
 * to this transaction: its transaction index (txn_index.h). The first send
 * there opens the row at the log end before appending (so read_committed
 * readers stop there), tells the producer (on_add(p): its partitions of
 * the transaction, for the commit's markers) and clears rows[p]. */
typedef struct {
    PyObject_HEAD
    PyObject *logs;        /* tuple of PartitionLog (keeps the handles mapped; errors go to their _fail) */
    PyObject *tables;      /* transactional: tuple of ProducerStateTable or None (keeps them open); else NULL */
    shmq_pstate **pstates; /* transactional: count of them (NULL: not in the transaction); else NULL */
    int64_t producer_id;
    int16_t epoch, attributes;
    PyObject *rows_obj;    /* transactional: tuple of the indexes' words or None (keeps them mapped) */
    int64_t **rows;        /* transactional: count of them, NULL once added (or for the Python send) */
    int64_t start_ms;      /* the transaction's start, for the rows it opens */
    PyObject *on_add;      /* on_add(partition): the C send added the partition to the transaction */
    int64_t max_bytes;
    Py_ssize_t count;
    shmq_log *handles[1];  /* count of them */
} Route;

static void Route_dealloc(Route *self)
{
    Py_XDECREF(self->logs);
    Py_XDECREF(self->tables);
    PyMem_Free(self->pstates);
    Py_XDECREF(self->rows_obj);
    PyMem_Free(self->rows);
    Py_XDECREF(self->on_add);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyTypeObject RouteType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmq.native._fastpath.Route",
    .tp_basicsize = offsetof(Route, handles),
    .tp_itemsize = sizeof(shmq_log *),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_dealloc = (destructor)Route_dealloc,
};

typedef struct {
    PyObject_HEAD
    PyObject *routes;        /* dict: topic -> Route, or None (the topic takes the Python path) */
    PyObject *last_topic, *last_route;   /* the last lookup (a producer usually sends to one topic) */
    PyObject *fallback;      /* the Python send: every case not handled here */
    PyObject *route_fn;      /* route_fn(topic) -> (handles, logs, max_bytes[, table_handles, tables,
                                producer_id, epoch, attributes]) or None */
    Partitioner *partitioner;
    PyTypeObject *md_type;   /* RecordMetadata */
    int64_t timeout_ns;      /* max_block_ms */
    int64_t recheck_ms;      /* routes are dropped (metadata re-checked) once the wall clock passes this */
    int64_t recheck_every_ms;
    long long fallbacks;     /* sends handed to the Python path (tests look) */
    int closed;
} FastProducer;

static void routes_clear(FastProducer *self);

static int FastProducer_init(FastProducer *self, PyObject *args, PyObject *kw)
{
    static char *names[] = { "fallback", "route_fn", "partitioner", "metadata_type", "timeout_ns",
                             "recheck_ms", NULL };
    PyObject *fallback, *route_fn, *md;
    Partitioner *part;
    long long timeout_ns, recheck;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOO!O!LL", names, &fallback, &route_fn, &PartitionerType, &part,
                                     &PyType_Type, &md, &timeout_ns, &recheck))
        return -1;
    if (!PyType_IsSubtype((PyTypeObject *)md, &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "metadata_type must be a tuple subclass");
        return -1;
    }
    routes_clear(self);
    Py_XSETREF(self->routes, PyDict_New());
    if (self->routes == NULL)
        return -1;
    Py_XSETREF(self->fallback, Py_NewRef(fallback));
    Py_XSETREF(self->route_fn, Py_NewRef(route_fn));
    Py_XSETREF(self->partitioner, (Partitioner *)Py_NewRef(part));
    Py_XSETREF(self->md_type, (PyTypeObject *)Py_NewRef(md));
    self->timeout_ns = timeout_ns;
    self->recheck_every_ms = recheck;
    self->recheck_ms = 0;
    self->closed = 0;
    return 0;
}

static void routes_clear(FastProducer *self)
{
    Py_CLEAR(self->last_topic);
    Py_CLEAR(self->last_route);
    if (self->routes != NULL)
        PyDict_Clear(self->routes);
}

/* A transactional route's rows (see Route): each a C-contiguous buffer of
 * at least the index's header and rows, or None. */
static int route_rows(Route *route, PyObject *rows, int64_t start_ms, PyObject *on_add)
{
    Py_ssize_t n = route->count;
    if (PyTuple_GET_SIZE(rows) != n || on_add == NULL || !PyCallable_Check(on_add) || start_ms < 0) {
        PyErr_SetString(PyExc_ValueError, "route: one row buffer or None per partition, a start time and on_add");
        return -1;
    }
    route->rows = PyMem_Calloc((size_t)n, sizeof(int64_t *));
    if (route->rows == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *w = PyTuple_GET_ITEM(rows, i);
        if (w == Py_None)
            continue;
        Py_buffer b;
        if (PyObject_GetBuffer(w, &b, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0)
            return -1;
        int ok = b.len >= SHMQ_TXN_ENTRIES_AT && ((uintptr_t)b.buf & 7) == 0 && route->pstates[i] != NULL;
        route->rows[i] = (int64_t *)b.buf;
        PyBuffer_Release(&b);   /* rows_obj keeps the exporters (and their mappings) alive */
        if (!ok) {
            PyErr_SetString(PyExc_ValueError, "route: a row buffer shorter than an index's header and rows, "
                            "or without its producer-state table");
            return -1;
        }
    }
    route->rows_obj = Py_NewRef(rows);
    route->start_ms = start_ms;
    route->on_add = Py_NewRef(on_add);
    return 0;
}

/* The route of topic: cached, else built from route_fn. Returns a borrowed
 * Route, Py_None (the Python path), or NULL with an exception. */
static PyObject *route_of(FastProducer *self, PyObject *topic)
{
    if (topic == self->last_topic)
        return self->last_route;
    PyObject *r = PyDict_GetItemWithError(self->routes, topic);
    if (r != NULL) {
        Py_XSETREF(self->last_topic, Py_NewRef(topic));
        Py_XSETREF(self->last_route, Py_NewRef(r));
    }
    if (r != NULL || PyErr_Occurred())
        return r;
    PyObject *info = PyObject_CallOneArg(self->route_fn, topic);
    if (info == NULL)
        return NULL;
    PyObject *value = Py_None;
    Route *route = NULL;
    if (info != Py_None) {
        PyObject *handles, *logs, *table_handles = NULL, *tables = NULL, *rows = NULL, *on_add = NULL;
        long long max_bytes, producer_id = -1, start_ms = 0;
        int epoch = -1, attributes = 0;
        if (!PyArg_ParseTuple(info, "O!O!L|O!O!LiiO!LO", &PyTuple_Type, &handles, &PyTuple_Type, &logs,
                              &max_bytes, &PyTuple_Type, &table_handles, &PyTuple_Type, &tables, &producer_id,
                              &epoch, &attributes, &PyTuple_Type, &rows, &start_ms, &on_add))
            goto fail;
        Py_ssize_t n = PyTuple_GET_SIZE(handles);
        if (n == 0 || n != PyTuple_GET_SIZE(logs)) {
            PyErr_SetString(PyExc_ValueError, "route: one handle per partition log");
            goto fail;
        }
        route = PyObject_NewVar(Route, &RouteType, n);
        if (route == NULL)
            goto fail;
        route->logs = Py_NewRef(logs);
        route->tables = NULL;
        route->pstates = NULL;
        route->rows_obj = NULL;
        route->rows = NULL;
        route->on_add = NULL;
        route->max_bytes = max_bytes;
        route->count = n;
        for (Py_ssize_t i = 0; i < n; i++)
            if (as_handle(PyTuple_GET_ITEM(handles, i), (void **)&route->handles[i]) < 0)
                goto fail;
        if (table_handles != NULL) {
            if (tables == NULL || PyTuple_GET_SIZE(table_handles) != n || PyTuple_GET_SIZE(tables) != n ||
                producer_id < 0 || epoch < 0 || epoch > INT16_MAX || attributes < 0 || attributes > INT16_MAX) {
                PyErr_SetString(PyExc_ValueError, "route: one producer-state table per partition, and a "
                                "producer id and epoch");
                goto fail;
            }
            route->tables = Py_NewRef(tables);
            route->pstates = PyMem_Calloc((size_t)n, sizeof(shmq_pstate *));
            if (route->pstates == NULL) {
                PyErr_NoMemory();
                goto fail;
            }
            for (Py_ssize_t i = 0; i < n; i++) {
                PyObject *h = PyTuple_GET_ITEM(table_handles, i);
                if (PyLong_Check(h) && PyLong_AsLongLong(h) == 0)
                    continue;   /* not in the transaction */
                if (PyTuple_GET_ITEM(tables, i) == Py_None) {
                    PyErr_SetString(PyExc_ValueError, "route: a table handle without its table");
                    goto fail;
                }
                if (as_handle(h, (void **)&route->pstates[i]) < 0)
                    goto fail;
            }
            route->producer_id = producer_id;
            route->epoch = (int16_t)epoch;
            route->attributes = (int16_t)attributes;
            if (rows != NULL && route_rows(route, rows, start_ms, on_add) < 0)
                goto fail;
        }
        value = (PyObject *)route;
    }
    if (PyDict_SetItem(self->routes, topic, value) < 0)
        goto fail;
    Py_XDECREF(route);
    Py_DECREF(info);
    return value;   /* borrowed from the dict */
fail:
    Py_XDECREF(route);
    Py_DECREF(info);
    return NULL;
}

/* send(topic, value=None, key=None, *, partition=None, headers=None, timestamp_ms=None) */
static PyObject *FastProducer_send(FastProducer *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    PyObject *topic = NULL, *value = Py_None, *key = Py_None, *partition = Py_None, *headers = Py_None,
             *timestamp = Py_None;
    if (self->fallback == NULL || self->route_fn == NULL || self->partitioner == NULL || self->md_type == NULL ||
        self->routes == NULL)
        return not_ready(self);
    if (nargs < 1 || nargs > 3 || self->closed)
        goto slow;
    topic = args[0];
    if (nargs > 1)
        value = args[1];
    if (nargs > 2)
        key = args[2];
    if (kwnames != NULL) {
        Py_ssize_t nk = PyTuple_GET_SIZE(kwnames);
        for (Py_ssize_t i = 0; i < nk; i++) {
            PyObject *name = PyTuple_GET_ITEM(kwnames, i), *v = args[nargs + i];
            if (name == s_partition)
                partition = v;
            else if (name == s_headers)
                headers = v;
            else if (name == s_timestamp_ms)
                timestamp = v;
            else if (name == s_value && nargs < 2)
                value = v;
            else if (name == s_key && nargs < 3)
                key = v;
            else
                goto slow;   /* not interned, or a bad name: Python sorts it out */
        }
    }
    if (!PyUnicode_CheckExact(topic))
        goto slow;
    Py_ssize_t vlen, klen;
    const char *vp, *kp;
    if (PyBytes_CheckExact(value)) {
        vp = PyBytes_AS_STRING(value);
        vlen = PyBytes_GET_SIZE(value);
    } else if (value == Py_None) {
        vp = NULL;
        vlen = -1;
    } else {
        goto slow;
    }
    if (PyBytes_CheckExact(key)) {
        kp = PyBytes_AS_STRING(key);
        klen = PyBytes_GET_SIZE(key);
    } else if (key == Py_None) {
        kp = NULL;
        klen = -1;
    } else {
        goto slow;
    }
    int64_t now = shmq_wall_ms();
    if (now >= self->recheck_ms) {
        /* Every recheck_every_ms the routes are rebuilt through the Python
         * route function, which re-reads the metadata when its version moved
         * (added partitions, deleted topics, a new leader). */
        routes_clear(self);
        self->recheck_ms = now + self->recheck_every_ms;
    }
    PyObject *r = route_of(self, topic);
    if (r == NULL)
        return NULL;
    if (r == Py_None)
        goto slow;
    Route *route = (Route *)r;
    if ((vlen > 0 ? vlen : 0) + (klen > 0 ? klen : 0) > route->max_bytes)
        goto slow;   /* MessageSizeTooLarge, raised by Python */
    int64_t ts = now;
    if (timestamp != Py_None) {
        if (!PyLong_CheckExact(timestamp))
            goto slow;
        int overflow;
        ts = PyLong_AsLongLongAndOverflow(timestamp, &overflow);
        if (overflow || ts < 0)
            goto slow;
    }
    uint8_t hstack[HEADERS_STACK];
    const char *hp = NULL;
    Py_ssize_t hlen = 0;
    if (headers != Py_None) {
        hlen = encode_headers(headers, hstack, sizeof hstack);
        if (hlen < 0)
            goto slow;
        hp = hlen ? (const char *)hstack : NULL;
    }
    int64_t p;
    if (partition == Py_None) {
        p = choose(self->partitioner, key == Py_None ? NULL : key, route->count);
        if (p < 0)
            return NULL;
    } else {
        if (!PyLong_CheckExact(partition))
            goto slow;
        int overflow;
        p = PyLong_AsLongLongAndOverflow(partition, &overflow);
        if (overflow || p < 0 || p >= route->count)
            goto slow;   /* maybe an added partition: Python re-reads the metadata */
    }
    shmq_log *log = route->handles[p];
    int64_t off;
    if (route->pstates != NULL) {
        /* Transactional: without waiting, holding the GIL (the GIL also keeps
         * the Python send of another thread out of the table entry). Anything
         * but success (a partition not added yet, a full ring, a locked entry,
         * fencing) is the Python path's, which waits or raises. */
        shmq_pstate *ps = route->pstates[p];
        if (ps == NULL)
            goto slow;
        if (route->rows != NULL && route->rows[p] != NULL) {
            /* The transaction's first record here: its row opens first, at
             * the end (txn_index.h). A busy lock, fencing or an older
             * instance's row: the Python send decides. */
            if (shmq_txn_open_row(route->rows[p], route->producer_id, route->epoch, shmq_log_end_offset(log),
                                  route->start_ms, 0) != SHMQ_OK)
                goto slow;
            PyObject *pn = PyLong_FromSsize_t((Py_ssize_t)p);
            PyObject *r = pn ? PyObject_CallOneArg(route->on_add, pn) : NULL;
            Py_XDECREF(pn);
            if (r == NULL)
                return NULL;   /* the row stays open: commit or abort ends it like any other */
            Py_DECREF(r);
            route->rows[p] = NULL;
        }
        off = shmq_pstate_append1_attr(ps, log, kp, klen, vp, vlen, hp, hlen, ts, route->producer_id, route->epoch,
                                       SHMQ_SEQ_NEXT, route->attributes, 0, NULL);
        if (off < 0)
            goto slow;
        PyObject *items[4] = { Py_NewRef(topic), PyLong_FromSsize_t((Py_ssize_t)p), PyLong_FromLongLong(off),
                               PyLong_FromLongLong(ts) };
        return new_named(self->md_type, 4, items);
    }
    /* First without waiting, holding the GIL (the common case: room in the
     * ring); a full ring is waited for with the GIL released. */
    off = shmq_log_append1(log, kp, klen, vp, vlen, hp, hlen, ts, NULL, 0);
    if (off < 0) {
        Py_INCREF(route);   /* the dict may drop it while the GIL is released */
        if (off == SHMQ_ERR_TIMEOUT && self->timeout_ns != 0) {
            /* The buffers stay alive: the caller's references hold value,
             * key and headers; hstack is ours. */
            int64_t timeout = self->timeout_ns;
            Py_BEGIN_ALLOW_THREADS
            off = shmq_log_append1(log, kp, klen, vp, vlen, hp, hlen, ts, NULL, timeout);
            Py_END_ALLOW_THREADS
        }
        if (off < 0 && off != SHMQ_ERR_NOT_LEADER) {
            fail_via(PyTuple_GET_ITEM(route->logs, p), off, "send");
            Py_DECREF(route);
            return NULL;
        }
        Py_DECREF(route);
        if (off < 0)
            goto slow;   /* a failover: the Python path retries on the new leader */
    }
    PyObject *items[4] = { Py_NewRef(topic), PyLong_FromSsize_t((Py_ssize_t)p), PyLong_FromLongLong(off),
                           PyLong_FromLongLong(ts) };
    return new_named(self->md_type, 4, items);
slow:
    self->fallbacks++;
    return PyObject_Vectorcall(self->fallback, args, nargsf, kwnames);
}

static PyObject *FastProducer_close(FastProducer *self, PyObject *unused)
{
    self->closed = 1;
    routes_clear(self);
    Py_RETURN_NONE;
}

static PyObject *FastProducer_invalidate(FastProducer *self, PyObject *unused)
{
    routes_clear(self);
    Py_RETURN_NONE;
}

static int FastProducer_traverse(FastProducer *self, visitproc visit, void *arg)
{
    Py_VISIT(self->routes);
    Py_VISIT(self->last_route);
    Py_VISIT(self->fallback);
    Py_VISIT(self->route_fn);
    Py_VISIT(self->partitioner);
    Py_VISIT(self->md_type);
    return 0;
}

static int FastProducer_clear(FastProducer *self)
{
    Py_CLEAR(self->last_topic);
    Py_CLEAR(self->last_route);
    Py_CLEAR(self->routes);
    Py_CLEAR(self->fallback);
    Py_CLEAR(self->route_fn);
    Py_CLEAR(self->partitioner);
    Py_CLEAR(self->md_type);
    return 0;
}

static void FastProducer_dealloc(FastProducer *self)
{
    PyObject_GC_UnTrack(self);
    FastProducer_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef FastProducer_methods[] = {
    { "send", (PyCFunction)(void (*)(void))FastProducer_send, METH_FASTCALL | METH_KEYWORDS,
      "send(topic, value=None, key=None, *, partition=None, headers=None, timestamp_ms=None)" },
    { "close", (PyCFunction)FastProducer_close, METH_NOARGS, "Drop every route; later sends take the Python path." },
    { "invalidate", (PyCFunction)FastProducer_invalidate, METH_NOARGS, "Drop every route (metadata changed)." },
    { NULL }
};

static PyMemberDef FastProducer_members[] = {
    { "fallbacks", T_LONGLONG, offsetof(FastProducer, fallbacks), READONLY, "sends handed to the Python path" },
    { NULL }
};

static PyTypeObject FastProducerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmq.native._fastpath.FastProducer",
    .tp_doc = "FastProducer(fallback, route_fn, partitioner, metadata_type, timeout_ns, recheck_ms)",
    .tp_basicsize = sizeof(FastProducer),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)FastProducer_init,
    .tp_traverse = (traverseproc)FastProducer_traverse,
    .tp_clear = (inquiry)FastProducer_clear,
    .tp_dealloc = (destructor)FastProducer_dealloc,
    .tp_methods = FastProducer_methods,
    .tp_members = FastProducer_members,
};

/* ----------------------------------------------------------- consumer
 *
 * FastConsumer serves poll() from the assigned partitions' LogReaders: it
 * reads through each reader's own cursor, buffer and views with the core's
 * shmq_log_read (seqlock re-check and CRC included), so reader positions
 * and retention see exactly what the Python path would do.
 *
 * Arming: before serving, and again every lease_ns, the Python arm
 * function runs the poll prelude (group changes, liveness, auto-commit,
 * leader changes, initial positions) and hands over the active partitions;
 * any change of the assignment, pause state or readers disarms (disarm()).
 *
 * Failed reads: a read (or the unblock check) of a partition that fails
 * names the partition in consumer._read_failed and hands the call to the
 * Python path, which reads that partition first and raises its error (a
 * KafkaStorageError sets it aside for retry_backoff_ms, so the next arm
 * leaves it out and the others go on); nothing is done for it while reads
 * succeed.
 *
 * Pending records: a read may return several records; the ones not yet
 * returned stay in the reader's buffer ("pending"). While some are pending,
 * consumer._buffer_tp names their partition, exactly as the Python path's
 * record buffer does, so its drop/seek logic applies unchanged (drop()
 * forgets them, take() hands them to the Python buffer).
 *
 * Positions: every returned record stores st.position = offset + 1.
 *
 * Isolation: a read_committed part reads below min(high watermark, LSO)
 * of its transaction index while no aborted range lies ahead of it (the
 * arm function checks; a new aborted range hands the call to Python, which
 * filters). Held at the LSO, the wait is a 0.5 ms sleep: an open
 * transaction's end rings no futex.
 *
 * Waiting on many partitions (the doorbell): the sleeper reads each log's
 * commit_seq, increments each log's waiters (seq_cst), re-checks every
 * cursor, then sleeps in one futex_waitv on all the commit_seq words. A
 * committer bumps commit_seq and wakes when waiters != 0 (log_wait.c), so a
 * commit to any of them wakes the consumer; producers pay nothing while
 * nobody waits. Without futex_waitv (Linux < 5.16) the sleep is a 1 ms
 * slice on one log at a time.
 */
#ifdef __linux__
#include <errno.h>
#include <time.h>
#include <unistd.h>
#include <sys/syscall.h>
#ifndef SYS_futex_waitv
#define SYS_futex_waitv 449
#endif
#endif

#define MAX_WAITV 128
/* The transaction index header words (shmq/ringlog/txn.py: F_LSO, F_COUNT). */
#define TXN_F_LSO 1
#define TXN_F_COUNT 2
#define LSO_POLL_NS 500000   /* a read_committed reader held at the LSO looks again this often (as Python) */
#define FUTEX2_SIZE_U32 0x02

struct waitv_entry {   /* struct futex_waitv of linux/futex.h (5.16+) */
    uint64_t val;
    uint64_t uaddr;
    uint32_t flags;
    uint32_t reserved;
};

static PyObject *s_position, *s_buffer_tp, *s_timeout, *s_num_messages, *s_read_failed;

typedef struct {
    PyObject *st;          /* the consumer's _Assigned */
    PyObject *reader;      /* its LogReader: owns cursor, buffer, views, unblock state */
    PyObject *topic, *partition;
    shmq_log *h;
    shmq_cursor *cur;
    uint8_t *buf;
    shmq_record_view *views;
    shmq_unblock_state *unblock;
    int64_t read_len, buf_len, max_views, spin_ns, slice_ns;
    int check_crc;
    int lazy;              /* only st is set: part_fn(st) sets the partition up when it is first read */
    /* read_committed (see "Isolation" above): */
    int committed;
    int lso_blocked;       /* the last read stopped at the LSO with records past it */
    PyObject *txn_obj;     /* the transaction index's header words (keeps the mapping alive), or NULL */
    const int64_t *txn_words;
    int64_t aborted_seen;  /* aborted ranges the reader may ignore (all end below its position); -1: none */
    PyMemberDef *position; /* the "position" slot of st's type, or NULL: set through setattr */
} Part;

typedef struct {
    PyObject_HEAD
    PyObject *consumer;
    PyObject *fallback;      /* Python poll */
    PyObject *fallback_consume;
    PyObject *arm_fn;        /* arm() -> (parts, max_records) or None: the Python path serves */
    PyObject *part_fn;       /* part_fn(st) -> the tuple of one partition (see part_parse) */
    PyTypeObject *msg_type;
    Part *parts;
    Py_ssize_t nparts, rr;
    Part pend;               /* part with pending records (pend_n > pend_i) */
    int64_t pend_i, pend_n, pend_used;
    int64_t lease_ns, lease_until;
    int64_t max_records;
    long long fallbacks;     /* calls handed to the Python poll / consume (tests look) */
    int armed;
    int doorbell;            /* 0 once futex_waitv was found missing */
    int closed;
    /* Hot-path commits (see FastConsumer_commit). */
    PyObject *commit_fn;     /* the Python commit: every other case */
    PyObject *entry_fn;      /* entry_fn(tp) -> see commit_entry(), or None */
    PyObject *entries;       /* dict (topic, partition) -> bytes of a CommitEntry */
    PyObject *vwords, *twords;   /* memoryviews of the metadata header and the offsets table (kept alive) */
    const uint64_t *version_word, *moved_word;
    int64_t *table;
    int64_t table_words;
    uint64_t entries_version;
    PyTypeObject *tp_type;   /* TopicPartition */
    int64_t gen_shift, offset_mask;
} FastConsumer;

typedef struct {
    int64_t offset_word, generation_word, generation;
} CommitEntry;

/* Every object __init__ sets is there (else not_ready()). */
static int fc_ready(FastConsumer *self)
{
    return self->consumer && self->fallback && self->fallback_consume && self->arm_fn && self->part_fn &&
           self->msg_type && self->commit_fn && self->entry_fn && self->entries && self->tp_type;
}

static void part_clear(Part *p)
{
    Py_CLEAR(p->txn_obj);
    Py_CLEAR(p->st);
    Py_CLEAR(p->reader);
    Py_CLEAR(p->topic);
    Py_CLEAR(p->partition);
}

static void part_copy(Part *dst, const Part *src)
{
    *dst = *src;
    Py_XINCREF(dst->txn_obj);
    Py_XINCREF(dst->st);
    Py_XINCREF(dst->reader);
    Py_XINCREF(dst->topic);
    Py_XINCREF(dst->partition);
}

static void parts_free(FastConsumer *self)
{
    for (Py_ssize_t i = 0; i < self->nparts; i++)
        part_clear(&self->parts[i]);
    PyMem_Free(self->parts);
    self->parts = NULL;
    self->nparts = 0;
}

static void pend_clear(FastConsumer *self)
{
    self->pend_i = self->pend_n = 0;
    part_clear(&self->pend);
}

/* One part from the arm function's tuple:
 * (st, reader, topic, partition, h, cur, buf, buf_len, read_len, views, max_views, unblock, check_crc,
 *  spin_ns, slice_ns, committed, txn_words, aborted_seen); txn_words is a C-contiguous int64 buffer of
 *  the transaction index header (shmq/ringlog/txn.py) or None */
static int part_parse(PyObject *t, Part *p)
{
    if (PyTuple_Check(t) && PyTuple_GET_SIZE(t) == 1) {
        p->st = Py_NewRef(PyTuple_GET_ITEM(t, 0));
        p->lazy = 1;
        return 0;
    }
    PyObject *st, *reader, *topic, *partition, *h, *cur, *buf, *views, *unblock, *words;
    long long buf_len, read_len, max_views, spin_ns, slice_ns, aborted_seen;
    int crc, committed;
    if (!PyArg_ParseTuple(t, "OOO!O!OOOLLOLOiLLiOL", &st, &reader, &PyUnicode_Type, &topic, &PyLong_Type,
                          &partition, &h, &cur, &buf, &buf_len, &read_len, &views, &max_views, &unblock, &crc,
                          &spin_ns, &slice_ns, &committed, &words, &aborted_seen))
        return -1;
    if (words != Py_None) {
        Py_buffer b;
        if (PyObject_GetBuffer(words, &b, PyBUF_C_CONTIGUOUS) < 0)
            return -1;
        int ok = b.len >= (Py_ssize_t)(TXN_F_COUNT + 1) * 8 && ((uintptr_t)b.buf & 7) == 0;
        p->txn_words = (const int64_t *)b.buf;
        PyBuffer_Release(&b);   /* p->txn_obj keeps the exporter (and its mapping) alive */
        if (!ok) {
            PyErr_SetString(PyExc_ValueError, "txn_words: not an aligned transaction index header");
            return -1;
        }
        p->txn_obj = Py_NewRef(words);
    }
    p->committed = committed != 0;
    p->aborted_seen = p->txn_words != NULL ? aborted_seen : -1;
    if (as_handle(h, (void **)&p->h) < 0 || as_handle(cur, (void **)&p->cur) < 0 ||
        as_handle(buf, (void **)&p->buf) < 0 || as_handle(views, (void **)&p->views) < 0 ||
        as_handle(unblock, (void **)&p->unblock) < 0)
        return -1;
    if (buf_len <= 0 || read_len <= 0 || read_len > buf_len || max_views <= 0 || slice_ns <= 0) {
        PyErr_SetString(PyExc_ValueError, "bad reader sizes");
        return -1;
    }
    p->st = Py_NewRef(st);
    p->reader = Py_NewRef(reader);
    /* st.position is a __slots__ member: stored through its PyMemberDef,
     * as setattr would after looking the descriptor up. */
    PyObject *d = PyObject_GetAttr((PyObject *)Py_TYPE(st), s_position);
    if (d == NULL)
        PyErr_Clear();
    else if (Py_IS_TYPE(d, &PyMemberDescr_Type))
        p->position = ((PyMemberDescrObject *)d)->d_member;
    Py_XDECREF(d);
    p->topic = Py_NewRef(topic);
    p->partition = Py_NewRef(partition);
    p->buf_len = buf_len;
    p->read_len = read_len;
    p->max_views = max_views;
    p->check_crc = crc;
    p->spin_ns = spin_ns;
    p->slice_ns = slice_ns;
    return 0;
}

/* Run the Python arm function. 1: armed; 0: the Python path serves this
 * call; -1: an exception (raised by the prelude, as the Python poll would). */
static int arm(FastConsumer *self)
{
    self->armed = 0;
    PyObject *r = PyObject_CallNoArgs(self->arm_fn);
    if (r == NULL)
        return -1;
    if (r == Py_None) {
        Py_DECREF(r);
        return 0;
    }
    PyObject *list;
    long long max_records;
    if (!PyArg_ParseTuple(r, "O!L", &PyList_Type, &list, &max_records) || max_records <= 0) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "arm: bad max_records");
        Py_DECREF(r);
        return -1;
    }
    Py_ssize_t n = PyList_GET_SIZE(list);
    Part *parts = PyMem_Calloc(n ? (size_t)n : 1, sizeof(Part));
    if (parts == NULL) {
        Py_DECREF(r);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (part_parse(PyList_GET_ITEM(list, i), &parts[i]) < 0) {
            for (Py_ssize_t j = 0; j <= i; j++)
                part_clear(&parts[j]);
            PyMem_Free(parts);
            Py_DECREF(r);
            return -1;
        }
    }
    Py_DECREF(r);
    parts_free(self);
    self->parts = parts;
    self->nparts = n;
    if (self->rr >= n)
        self->rr = 0;
    self->max_records = max_records;
    self->lease_until = shmq_now_ns() + self->lease_ns;
    self->armed = 1;
    return 1;
}

/* Set up a lazy part through part_fn (initial position, as the Python
 * path does when it first reads a partition). */
static int part_setup(FastConsumer *self, Part *p)
{
    PyObject *t = PyObject_CallOneArg(self->part_fn, p->st);
    if (t == NULL)
        return -1;
    Part fresh = { 0 };
    int rc = part_parse(t, &fresh);
    Py_DECREF(t);
    if (rc < 0 || fresh.lazy) {
        part_clear(&fresh);
        if (rc == 0)
            PyErr_SetString(PyExc_ValueError, "part_fn returned no reader");
        return -1;
    }
    part_clear(p);
    *p = fresh;
    return 0;
}

/* part_read's answer for "leave this call to the Python path" (not an error). */
#define PART_HANDOFF INT64_MIN

/* Read up to max records of part p; 0 when nothing is there yet, < 0 an
 * error, PART_HANDOFF for the Python path.
 *
 * read_committed: the high watermark is loaded before the index's LSO word
 * (acquire; the writer publishes a transaction's start before the
 * transaction's first append, so min(hw, lso) never lets an open
 * transaction's record through: shmq/ringlog/txn.py). Records at or past
 * that limit are cut off and the cursor goes back to it (the LSO is a batch
 * start). A change of the aborted-range count since arming hands the call
 * to Python, whose filter drops aborted records. */
static int64_t part_read(Part *p, int64_t max, int64_t *used)
{
    if (max > p->max_views)
        max = p->max_views;
    int64_t limit = INT64_MAX;
    if (p->committed) {
        if (p->txn_words == NULL ||
            __atomic_load_n(&p->txn_words[TXN_F_COUNT], __ATOMIC_ACQUIRE) != p->aborted_seen)
            return PART_HANDOFF;
        int64_t hw = shmq_log_high_watermark(p->h);
        int64_t lso = __atomic_load_n(&p->txn_words[TXN_F_LSO], __ATOMIC_ACQUIRE);
        limit = lso < 0 || lso > hw ? hw : lso;
        p->lso_blocked = 0;
        if (p->cur->next_offset >= limit) {
            p->lso_blocked = limit < hw;
            return 0;
        }
    }
    int64_t n = shmq_log_read(p->h, p->cur, p->buf, p->read_len, p->views, max, p->check_crc, used);
    if (n == SHMQ_ERR_TOO_LARGE && p->read_len < p->buf_len)   /* one frame bigger than read_len */
        n = shmq_log_read(p->h, p->cur, p->buf, p->buf_len, p->views, max, p->check_crc, used);
    if (n > 0 && p->views[n - 1].offset >= limit) {
        int64_t k = 0;
        while (k < n && p->views[k].offset < limit)
            k++;
        int rc = shmq_log_seek(p->h, p->cur, limit);
        if (rc < 0)
            return rc;
        p->lso_blocked = k == 0;
        n = k;
    }
    return n;
}

/* Decoded headers of a record, as the Python path's decode_headers. */
static PyObject *headers_of(const uint8_t *buf, int64_t used, int64_t pos, int64_t count)
{
    PyObject *list = PyList_New(count);
    if (list == NULL)
        return NULL;
    const uint8_t *p = buf + pos, *end = buf + used;
    for (int64_t k = 0; k < count; k++) {
        int64_t len[2];
        for (int f = 0; f < 2; f++) {
            uint64_t z = 0;
            int shift = 0;
            for (;;) {
                if (p >= end || shift > 63)
                    goto corrupt;
                uint8_t b = *p++;
                z |= (uint64_t)(b & 0x7F) << shift;
                if (!(b & 0x80))
                    break;
                shift += 7;
            }
            len[f] = (int64_t)(z >> 1) ^ -(int64_t)(z & 1);
            if ((f == 0 && len[f] < 0) || len[f] > end - p)
                goto corrupt;
            if (f == 0) {
                PyObject *key = PyUnicode_DecodeUTF8((const char *)p, (Py_ssize_t)len[0], "replace");
                if (key == NULL)
                    goto fail;
                PyList_SET_ITEM(list, k, key);   /* replaced by the pair below */
                p += len[0];
            }
        }
        PyObject *value = len[1] < 0 ? Py_NewRef(Py_None) : PyBytes_FromStringAndSize((const char *)p,
                                                                                       (Py_ssize_t)len[1]);
        if (value == NULL)
            goto fail;
        if (len[1] > 0)
            p += len[1];
        PyObject *key = PyList_GET_ITEM(list, k);
        PyObject *pair = PyTuple_Pack(2, key, value);
        Py_DECREF(value);
        if (pair == NULL)
            goto fail;
        PyList_SET_ITEM(list, k, pair);
        Py_DECREF(key);
    }
    return list;
corrupt:
    PyErr_SetString(PyExc_ValueError, "a record header runs past the record");
fail:
    Py_DECREF(list);
    return NULL;
}

/* Message for view i of part p. NULL with an exception on error. */
static PyObject *message_at(FastConsumer *self, Part *p, int64_t i, int64_t used)
{
    const shmq_record_view *v = &p->views[i];
    if ((v->key_len >= 0 && (v->key_pos < 0 || v->key_pos + v->key_len > used)) ||
        (v->value_len >= 0 && (v->value_pos < 0 || v->value_pos + v->value_len > used)) ||
        (v->headers_count > 0 && (v->headers_pos < 0 || v->headers_pos > used))) {
        PyErr_SetString(PyExc_ValueError, "a decoded record points outside the read buffer");
        return NULL;
    }
    PyObject *items[7];
    items[0] = Py_NewRef(p->topic);
    items[1] = Py_NewRef(p->partition);
    items[2] = PyLong_FromLongLong(v->offset);
    items[3] = v->key_len < 0 ? Py_NewRef(Py_None)
                              : PyBytes_FromStringAndSize((const char *)p->buf + v->key_pos, (Py_ssize_t)v->key_len);
    items[4] = v->value_len < 0 ? Py_NewRef(Py_None)
                                : PyBytes_FromStringAndSize((const char *)p->buf + v->value_pos,
                                                            (Py_ssize_t)v->value_len);
    items[5] = v->headers_count > 0 ? headers_of(p->buf, used, v->headers_pos, v->headers_count)
                                    : PyTuple_New(0);
    items[6] = PyLong_FromLongLong(v->timestamp);
    return new_named(self->msg_type, 7, items);
}

static int set_position(Part *p, int64_t next)
{
    PyObject *o = PyLong_FromLongLong(next);
    if (o == NULL)
        return -1;
    int rc = p->position != NULL ? PyMember_SetOne((char *)p->st, p->position, o) : PyObject_SetAttr(p->st, s_position, o);
    Py_DECREF(o);
    return rc;
}

/* The next pending record, its position stored; the consumer's _buffer_tp
 * is cleared once none is left. */
static PyObject *next_pending(FastConsumer *self)
{
    PyObject *msg = message_at(self, &self->pend, self->pend_i, self->pend_used);
    if (msg == NULL)
        return NULL;
    int64_t off = self->pend.views[self->pend_i].offset;
    self->pend_i++;
    if (set_position(&self->pend, off + 1) < 0) {
        Py_DECREF(msg);
        return NULL;
    }
    if (self->pend_i >= self->pend_n) {
        pend_clear(self);
        if (PyObject_SetAttr(self->consumer, s_buffer_tp, Py_None) < 0) {
            Py_DECREF(msg);
            return NULL;
        }
    }
    return msg;
}

/* Records just read (n of them, used bytes) into part p: the first is
 * returned, the rest become pending. */
static PyObject *first_of_read(FastConsumer *self, Part *p, int64_t n, int64_t used)
{
    if (n == 1) {
        PyObject *msg = message_at(self, p, 0, used);
        if (msg != NULL && set_position(p, p->views[0].offset + 1) < 0)
            Py_CLEAR(msg);
        return msg;
    }
    pend_clear(self);
    part_copy(&self->pend, p);
    self->pend_i = 0;
    self->pend_n = n;
    self->pend_used = used;
    if (PyObject_SetAttr(self->consumer, s_buffer_tp, p->st) < 0) {
        pend_clear(self);
        return NULL;
    }
    return next_pending(self);
}

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* The clock of the lease check and of the poll's remaining timeout:
 * CLOCK_MONOTONIC_COARSE, a read of the vDSO page without the time-stamp
 * counter (a few ns instead of ~20 here, per poll), on the same base as
 * shmq_now_ns() but a scheduler tick (1-4 ms) behind at most: a lease runs
 * out up to a tick late, which arming every lease_ns does not mind. */
static inline int64_t lease_clock_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void sleep_ns(int64_t ns)
{
    struct timespec ts = { ns / 1000000000LL, ns % 1000000000LL };
    nanosleep(&ts, NULL);
}

/* Wait (GIL released by the caller) until a cursor may have something or
 * timeout_ns passes: spin first, then the doorbell (see above). */
static void wait_parts(FastConsumer *self, Part *parts, Py_ssize_t n, int64_t spin_ns, int64_t timeout_ns)
{
    if (n == 0) {
        sleep_ns(timeout_ns);
        return;
    }
    if (n == 1) {
        shmq_log_wait(parts[0].h, parts[0].cur, spin_ns, timeout_ns);
        return;
    }
    int64_t start = shmq_now_ns();
    for (int k = 0;; k++) {
        for (Py_ssize_t i = 0; i < n; i++)
            if (shmq_log_ready(parts[i].h, parts[i].cur))
                return;
        if ((k & 15) == 0 && shmq_now_ns() - start >= spin_ns)
            break;
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
    }
#ifdef __linux__
    if (self->doorbell) {
        struct waitv_entry w[MAX_WAITV];
        Py_ssize_t m = n < MAX_WAITV ? n : MAX_WAITV;
        if (n > m)
            timeout_ns = min64(timeout_ns, 1000000);   /* the others are checked after a short slice */
        /* Control-block words through shmq_log_doorbell (guarded: a
         * partition.ctl shrunk under us is an error there, and the next
         * read reports it, not a SIGBUS here). */
        Py_ssize_t added = 0;
        int ready = 0;
        for (Py_ssize_t i = 0; i < m && !ready; i++) {
            uint32_t *word = NULL, val = 0;
            ready = shmq_log_doorbell(parts[i].h, 0, &word, &val) != SHMQ_OK;
            w[i].val = val;
            w[i].uaddr = (uint64_t)(uintptr_t)word;
            w[i].flags = FUTEX2_SIZE_U32;
            w[i].reserved = 0;
        }
        while (added < m && !ready) {
            if (shmq_log_doorbell(parts[added].h, 1, NULL, NULL) != SHMQ_OK)
                ready = 1;              /* that log failed: the next read reports it */
            else
                added++;
        }
        for (Py_ssize_t i = 0; i < n && !ready; i++)
            ready = shmq_log_ready(parts[i].h, parts[i].cur);
        if (!ready) {
            struct timespec abs;
            clock_gettime(CLOCK_MONOTONIC, &abs);
            int64_t t = (int64_t)abs.tv_nsec + timeout_ns;
            abs.tv_sec += t / 1000000000LL;
            abs.tv_nsec = t % 1000000000LL;
            long rc = syscall(SYS_futex_waitv, w, (unsigned)m, 0, &abs, CLOCK_MONOTONIC);
            if (rc < 0 && errno == ENOSYS)
                self->doorbell = 0;
        }
        for (Py_ssize_t i = 0; i < added; i++)
            shmq_log_doorbell(parts[i].h, -1, NULL, NULL);
        if (self->doorbell)
            return;
    }
#endif
    /* No doorbell: a short slice on each log in turn. */
    Part *p = &parts[self->rr % n];
    shmq_log_wait(p->h, p->cur, 0, min64(timeout_ns, 1000000));
}

/* Parse poll(timeout=1.0) / consume(num_messages=1, timeout=-1) arguments;
 * returns 0, or -1: leave the call to Python. */
static int parse_timeout(PyObject *o, double *out)
{
    if (PyFloat_CheckExact(o))
        *out = PyFloat_AS_DOUBLE(o);
    else if (PyLong_CheckExact(o))
        *out = PyLong_AsDouble(o);
    else
        return -1;
    if (*out == -1.0 && PyErr_Occurred()) {
        PyErr_Clear();
        return -1;
    }
    return *out != *out ? -1 : 0;   /* NaN */
}

static PyObject *call_fallback(PyObject *fn, double timeout)
{
    PyObject *t = PyFloat_FromDouble(timeout);
    if (t == NULL)
        return NULL;
    PyObject *r = PyObject_CallOneArg(fn, t);
    Py_DECREF(t);
    return r;
}

/* A read of part p failed: name it for the Python path (see "Failed
 * reads" above). Returns fetch()'s 2, or -1 on an exception. */
static int read_failed(FastConsumer *self, Part *p)
{
    return PyObject_SetAttr(self->consumer, s_read_failed, p->st) < 0 ? -1 : 2;
}

/* Read from the next partition (round-robin) that has records, waiting up
 * to timeout. Returns 1 with *got_part/n/used set, 0 on timeout, 2: leave
 * the call to Python (an error to report, or the arm function said so), -1
 * on an exception. */
static int fetch(FastConsumer *self, int64_t max, double timeout, Part **got, int64_t *got_n, int64_t *got_used)
{
    int64_t now, deadline = -1;   /* the clock is read once a pass found nothing */
    int waited = 0;
    for (;;) {
        Py_ssize_t n = self->nparts;
        for (Py_ssize_t k = 0; k < n; k++) {
            Py_ssize_t idx = (self->rr + k) % n;
            Part *p = &self->parts[idx];
            if (p->lazy && part_setup(self, p) < 0)
                return -1;
            int64_t used = 0;
            int64_t r = part_read(p, max, &used);
            if (r == PART_HANDOFF)
                return 2;
            if (r < 0)
                return read_failed(self, p);   /* the Python path reads it again and reports (or resets) */
            if (r > 0) {
                self->rr = (idx + 1) % n;
                *got = p;
                *got_n = r;
                *got_used = used;
                return 1;
            }
        }
        /* Every part is set up now (the pass above visited each). */
        if (waited) {
            /* Nothing after a wait: pad over a claim whose producer died. */
            for (Py_ssize_t k = 0; k < n; k++) {
                Part *p = &self->parts[k];
                if (shmq_log_unblock_cursor(p->h, p->cur, p->unblock) < 0)
                    return read_failed(self, p);
            }
        }
        now = shmq_now_ns();
        if (deadline < 0)
            deadline = timeout <= 0 ? now : now + (timeout > 1e9 ? (int64_t)1e18 : (int64_t)(timeout * 1e9));
        if (now >= deadline)
            return 0;
        if (now >= self->lease_until) {
            int rc = arm(self);
            if (rc <= 0)
                return rc < 0 ? -1 : 2;
            continue;
        }
        int64_t slice = min64(deadline, self->lease_until) - now;
        int64_t spin = 0;
        for (Py_ssize_t k = 0; k < n; k++) {
            slice = min64(slice, self->parts[k].slice_ns);
            if (!waited && self->parts[k].spin_ns > spin)
                spin = self->parts[k].spin_ns;
        }
        Part *parts = self->parts;
        int blocked = 0;   /* a partition waits for an open transaction: no futex tells its end */
        for (Py_ssize_t k = 0; k < n; k++)
            blocked |= parts[k].lso_blocked;
        Py_BEGIN_ALLOW_THREADS
        if (blocked)
            sleep_ns(min64(slice, LSO_POLL_NS));
        else
            wait_parts(self, parts, n, spin, slice);
        Py_END_ALLOW_THREADS
        waited = 1;
        if (PyErr_CheckSignals() < 0)   /* Ctrl-C ends a long poll */
            return -1;
    }
}

/* poll(timeout=1.0) */
static PyObject *FastConsumer_poll(FastConsumer *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    if (!fc_ready(self))
        return not_ready(self);
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    PyObject *t = nargs ? args[0] : NULL;
    double timeout = 1.0;
    if (nargs > 1)
        goto slow;
    if (kwnames != NULL) {
        if (PyTuple_GET_SIZE(kwnames) != 1 || PyTuple_GET_ITEM(kwnames, 0) != s_timeout || nargs)
            goto slow;
        t = args[0];
    }
    if (t != NULL && parse_timeout(t, &timeout) < 0)
        goto slow;
    if (!self->armed || lease_clock_ns() >= self->lease_until) {
        int rc = arm(self);
        if (rc < 0)
            return NULL;
        if (rc == 0)
            goto slow;
    }
    if (self->pend_i < self->pend_n)
        return next_pending(self);
    Part *p;
    int64_t n, used;
    int64_t start = lease_clock_ns();
    switch (fetch(self, self->max_records, timeout, &p, &n, &used)) {
    case 1:
        return first_of_read(self, p, n, used);
    case 0:
        Py_RETURN_NONE;
    case 2:
        self->armed = 0;
        self->fallbacks++;
        return call_fallback(self->fallback, fmax(0.0, timeout - (double)(lease_clock_ns() - start) / 1e9));
    default:
        return NULL;
    }
slow:
    self->armed = 0;
    self->fallbacks++;
    return PyObject_Vectorcall(self->fallback, args, nargsf, kwnames);
}

/* Append messages of views [from, to) of part p to list; the position of
 * the partition moves past the last. */
static int append_range(FastConsumer *self, PyObject *list, Part *p, int64_t from, int64_t to, int64_t used)
{
    for (int64_t i = from; i < to; i++) {
        PyObject *msg = message_at(self, p, i, used);
        if (msg == NULL)
            return -1;
        int rc = PyList_Append(list, msg);
        Py_DECREF(msg);
        if (rc < 0)
            return -1;
    }
    return to > from ? set_position(p, p->views[to - 1].offset + 1) : 0;
}

/* consume(num_messages=1, timeout=-1): up to num_messages records, waiting
 * up to timeout for the first, then topping up from the other partitions
 * without waiting (as the Python consume). */
static PyObject *FastConsumer_consume(FastConsumer *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    if (!fc_ready(self))
        return not_ready(self);
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    PyObject *num = nargs > 0 ? args[0] : NULL, *t = nargs > 1 ? args[1] : NULL;
    double timeout = -1;
    if (nargs > 2)
        goto slow;
    if (kwnames != NULL) {
        for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(kwnames); i++) {
            PyObject *name = PyTuple_GET_ITEM(kwnames, i);
            if (name == s_num_messages && num == NULL)
                num = args[nargs + i];
            else if (name == s_timeout && t == NULL)
                t = args[nargs + i];
            else
                goto slow;
        }
    }
    long long want = 1;
    if (num != NULL) {
        if (!PyLong_CheckExact(num))
            goto slow;
        int overflow;
        want = PyLong_AsLongLongAndOverflow(num, &overflow);
        if (overflow || want <= 0)
            goto slow;   /* InvalidConfig from Python */
    }
    if (t != NULL && t != Py_None && parse_timeout(t, &timeout) < 0)
        goto slow;
    if (t == Py_None || timeout < 0)
        timeout = 1e9;
    if (!self->armed || lease_clock_ns() >= self->lease_until) {
        int rc = arm(self);
        if (rc < 0)
            return NULL;
        if (rc == 0)
            goto slow;
    }
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    if (self->pend_i < self->pend_n) {
        int64_t to = min64(self->pend_n, self->pend_i + want);
        if (append_range(self, out, &self->pend, self->pend_i, to, self->pend_used) < 0)
            goto fail;
        self->pend_i = to;
        if (self->pend_i >= self->pend_n) {
            pend_clear(self);
            if (PyObject_SetAttr(self->consumer, s_buffer_tp, Py_None) < 0)
                goto fail;
        }
        return out;
    }
    int64_t start = shmq_now_ns();
    for (Py_ssize_t round = 0; PyList_GET_SIZE(out) < want; round++) {
        Part *p;
        int64_t n, used;
        if (round > 0 && round >= self->nparts)
            break;
        int rc = fetch(self, want - PyList_GET_SIZE(out), round ? 0 : timeout, &p, &n, &used);
        if (rc == 0)
            break;
        if (rc < 0)
            goto fail;
        if (rc == 2) {
            self->armed = 0;
            if (PyList_GET_SIZE(out))
                break;   /* what was read is returned; the next call reports */
            Py_DECREF(out);
            self->fallbacks++;
            double left = timeout - (double)(shmq_now_ns() - start) / 1e9;
            return PyObject_CallFunction(self->fallback_consume, "Ld", want, left > 0 ? left : 0.0);
        }
        if (append_range(self, out, p, 0, n, used) < 0)
            goto fail;
    }
    return out;
fail:
    Py_DECREF(out);
    return NULL;
slow:
    self->armed = 0;
    self->fallbacks++;
    return PyObject_Vectorcall(self->fallback_consume, args, nargsf, kwnames);
}

/* The pending records as Messages (for the Python path's buffer); none stay. */
static PyObject *FastConsumer_take(FastConsumer *self, PyObject *unused)
{
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    for (; self->pend_i < self->pend_n; self->pend_i++) {
        PyObject *msg = message_at(self, &self->pend, self->pend_i, self->pend_used);
        if (msg == NULL || PyList_Append(out, msg) < 0) {
            Py_XDECREF(msg);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(msg);
    }
    pend_clear(self);
    return out;
}

static PyObject *FastConsumer_drop(FastConsumer *self, PyObject *unused)
{
    pend_clear(self);
    self->armed = 0;
    Py_RETURN_NONE;
}

static PyObject *FastConsumer_disarm(FastConsumer *self, PyObject *unused)
{
    self->armed = 0;
    if (self->entries != NULL)
        PyDict_Clear(self->entries);   /* generations may have changed */
    Py_RETURN_NONE;
}

static PyObject *FastConsumer_close(FastConsumer *self, PyObject *unused)
{
    pend_clear(self);
    parts_free(self);
    self->armed = 0;
    self->closed = 1;
    if (self->entries != NULL)
        PyDict_Clear(self->entries);
    Py_CLEAR(self->vwords);
    Py_CLEAR(self->twords);
    self->version_word = self->moved_word = NULL;
    self->table = NULL;
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------ commits
 *
 * commit(message=None, offsets=None, asynchronous=True) with
 * asynchronous=True is the store of Cluster.commit_offsets and nothing
 * else: per partition one dict lookup of its entry (offset word, generation
 * word, the generation this member owns it in), the fencing check (the
 * entry's generation word must still read that generation), then one
 * aligned 8-byte release store of gen << 48 | offset. Every partition is
 * checked before anything is stored. Entries come from entry_fn (the
 * Python lookup, one RPC the first time) and are forgotten when the
 * published metadata version moves, and on every disarm (group changes).
 * Anything else (sync commits, current positions, a failed check) is the
 * Python commit's, which raises its errors.
 */
static PyObject *buffer_words(PyObject *mv, int64_t *count)
{
    if (!PyMemoryView_Check(mv)) {
        PyErr_SetString(PyExc_TypeError, "expected a memoryview");
        return NULL;
    }
    Py_buffer *b = PyMemoryView_GET_BUFFER(mv);
    if (b->buf == NULL || b->len % 8 || ((uintptr_t)b->buf & 7)) {
        PyErr_SetString(PyExc_ValueError, "expected an aligned memoryview of 8-byte words");
        return NULL;
    }
    *count = b->len / 8;
    return (PyObject *)b->buf;
}

/* The entry of tp, looked up or fetched. NULL: Python handles it (exception
 * set only for real errors, which are then returned). */
static const CommitEntry *commit_entry(FastConsumer *self, PyObject *tp, int *error)
{
    *error = 0;
    if (self->version_word != NULL) {
        uint64_t moved = __atomic_load_n(self->moved_word, __ATOMIC_ACQUIRE);
        uint64_t v = __atomic_load_n(self->version_word, __ATOMIC_ACQUIRE);
        if (moved || v != self->entries_version)
            PyDict_Clear(self->entries);
    }
    PyObject *e = PyDict_GetItemWithError(self->entries, tp);
    if (e != NULL)
        return (const CommitEntry *)PyBytes_AS_STRING(e);
    if (PyErr_Occurred()) {
        *error = 1;
        return NULL;
    }
    /* entry_fn(tp) -> (version, vwords, w_version, w_moved, twords, offset_word, generation_word, generation) */
    PyObject *r = PyObject_CallOneArg(self->entry_fn, tp);
    if (r == NULL || r == Py_None) {
        *error = r == NULL;
        Py_XDECREF(r);
        return NULL;
    }
    unsigned long long version;
    PyObject *vwords, *twords;
    long long w_version, w_moved;
    CommitEntry ce;
    if (!PyArg_ParseTuple(r, "KOLLOLLL", &version, &vwords, &w_version, &w_moved, &twords, &ce.offset_word,
                          &ce.generation_word, &ce.generation)) {
        Py_DECREF(r);
        *error = 1;
        return NULL;
    }
    int64_t nv, nt;
    uint64_t *vbase = (uint64_t *)buffer_words(vwords, &nv);
    int64_t *tbase = vbase ? (int64_t *)buffer_words(twords, &nt) : NULL;
    if (tbase == NULL || w_version < 0 || w_version >= nv || w_moved < 0 || w_moved >= nv ||
        ce.offset_word < 0 || ce.offset_word >= nt || ce.generation_word < 0 || ce.generation_word >= nt) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "commit entry outside its table");
        Py_DECREF(r);
        *error = 1;
        return NULL;
    }
    if (vwords != self->vwords || twords != self->twords || version != self->entries_version) {
        PyDict_Clear(self->entries);
        Py_XSETREF(self->vwords, Py_NewRef(vwords));
        Py_XSETREF(self->twords, Py_NewRef(twords));
        self->version_word = vbase + w_version;
        self->moved_word = vbase + w_moved;
        self->table = tbase;
        self->table_words = nt;
        self->entries_version = version;
    }
    Py_DECREF(r);
    e = PyBytes_FromStringAndSize((const char *)&ce, sizeof ce);
    if (e == NULL || PyDict_SetItem(self->entries, tp, e) < 0) {
        Py_XDECREF(e);
        *error = 1;
        return NULL;
    }
    Py_DECREF(e);   /* the dict holds it */
    return (const CommitEntry *)PyBytes_AS_STRING(e);
}

/* 1: word for entry e and offset o is ready in *word; 0: Python handles it. */
static int commit_check(FastConsumer *self, const CommitEntry *e, PyObject *offset, int64_t *word)
{
    if (!PyLong_CheckExact(offset))
        return 0;
    int overflow;
    long long o = PyLong_AsLongLongAndOverflow(offset, &overflow);
    if (overflow || o < 0 || o > self->offset_mask)
        return 0;
    if (__atomic_load_n(&self->table[e->generation_word], __ATOMIC_ACQUIRE) != e->generation)
        return 0;   /* fenced: CommitFailed from the Python commit */
    *word = (e->generation << self->gen_shift) | o;
    return 1;
}

static PyObject *FastConsumer_commit(FastConsumer *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    if (!fc_ready(self))
        return not_ready(self);
    static PyObject *s_message, *s_offsets, *s_asynchronous;
    if (s_message == NULL && (!(s_message = PyUnicode_InternFromString("message")) ||
                              !(s_offsets = PyUnicode_InternFromString("offsets")) ||
                              !(s_asynchronous = PyUnicode_InternFromString("asynchronous"))))
        return NULL;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    PyObject *a[3] = { Py_None, Py_None, Py_True };
    if (nargs > 3 || self->closed)
        goto slow;
    for (Py_ssize_t i = 0; i < nargs; i++)
        a[i] = args[i];
    if (kwnames != NULL) {
        for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(kwnames); i++) {
            PyObject *name = PyTuple_GET_ITEM(kwnames, i);
            int k = name == s_message ? 0 : name == s_offsets ? 1 : name == s_asynchronous ? 2 : -1;
            if (k < nargs)
                goto slow;
            a[k] = args[nargs + i];
        }
    }
    if (a[2] != Py_True)
        goto slow;
    int error;
    if (a[1] == Py_None && a[0] != Py_None) {
        PyObject *m = a[0];
        if (Py_TYPE(m) != self->msg_type)
            goto slow;
        PyObject *topic = PyTuple_GET_ITEM(m, 0), *part = PyTuple_GET_ITEM(m, 1), *off = PyTuple_GET_ITEM(m, 2);
        if (!PyLong_CheckExact(off))
            goto slow;
        int overflow;
        long long o = PyLong_AsLongLongAndOverflow(off, &overflow);
        if (overflow || o < 0 || o >= self->offset_mask)
            goto slow;
        PyObject *items[2] = { Py_NewRef(topic), Py_NewRef(part) };
        PyObject *tp = new_named(self->tp_type, 2, items);
        if (tp == NULL)
            return NULL;
        const CommitEntry *e = commit_entry(self, tp, &error);
        PyObject *next = e != NULL ? PyLong_FromLongLong(o + 1) : NULL;
        int64_t word;
        if (e == NULL || next == NULL || !commit_check(self, e, next, &word)) {
            Py_DECREF(tp);
            Py_XDECREF(next);
            if (error || PyErr_Occurred())
                return NULL;
            goto slow;
        }
        __atomic_store_n(&self->table[e->offset_word], word, __ATOMIC_RELEASE);
        PyObject *out = PyDict_New();
        if (out == NULL || PyDict_SetItem(out, tp, next) < 0)
            Py_CLEAR(out);
        Py_DECREF(tp);
        Py_DECREF(next);
        return out;
    }
    if (a[0] == Py_None && PyDict_CheckExact(a[1])) {
        PyObject *offsets = a[1];
        Py_ssize_t n = PyDict_GET_SIZE(offsets);
        if (n == 0 || n > 64)
            goto slow;
        const CommitEntry *es[64];
        int64_t words[64];
        Py_ssize_t pos = 0, i = 0;
        PyObject *tp, *off;
        /* Check every partition first: nothing is stored unless all pass. */
        while (PyDict_Next(offsets, &pos, &tp, &off)) {
            if (Py_TYPE(tp) != self->tp_type)
                goto slow;
            es[i] = commit_entry(self, tp, &error);
            if (es[i] == NULL) {
                if (error)
                    return NULL;
                goto slow;
            }
            if (!commit_check(self, es[i], off, &words[i]))
                goto slow;
            i++;
        }
        if (i != n)
            goto slow;
        for (i = 0; i < n; i++)
            __atomic_store_n(&self->table[es[i]->offset_word], words[i], __ATOMIC_RELEASE);
        return PyDict_Copy(offsets);
    }
slow:
    return PyObject_Vectorcall(self->commit_fn, args, nargsf, kwnames);
}

static int FastConsumer_init(FastConsumer *self, PyObject *args, PyObject *kw)
{
    static char *names[] = { "consumer", "poll", "consume", "arm", "part", "message_type", "lease_ns", "commit",
                             "commit_entry", "topic_partition_type", "gen_shift", NULL };
    PyObject *consumer, *poll, *consume, *arm_fn, *part_fn, *mt, *commit_fn, *entry_fn, *tpt;
    long long lease;
    int gen_shift;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOOOO!LOOO!i", names, &consumer, &poll, &consume, &arm_fn, &part_fn,
                                     &PyType_Type, &mt, &lease, &commit_fn, &entry_fn, &PyType_Type, &tpt,
                                     &gen_shift))
        return -1;
    if (!PyType_IsSubtype((PyTypeObject *)tpt, &PyTuple_Type) || gen_shift < 1 || gen_shift > 62) {
        PyErr_SetString(PyExc_TypeError, "topic_partition_type must be a tuple subclass, gen_shift in 1..62");
        return -1;
    }
    Py_XSETREF(self->entries, PyDict_New());
    if (self->entries == NULL)
        return -1;
    Py_XSETREF(self->commit_fn, Py_NewRef(commit_fn));
    Py_XSETREF(self->entry_fn, Py_NewRef(entry_fn));
    Py_XSETREF(self->tp_type, (PyTypeObject *)Py_NewRef(tpt));
    self->gen_shift = gen_shift;
    self->offset_mask = ((int64_t)1 << gen_shift) - 1;
    if (!PyType_IsSubtype((PyTypeObject *)mt, &PyTuple_Type) || lease <= 0) {
        PyErr_SetString(PyExc_TypeError, "message_type must be a tuple subclass, lease_ns positive");
        return -1;
    }
    Py_XSETREF(self->consumer, Py_NewRef(consumer));
    Py_XSETREF(self->fallback, Py_NewRef(poll));
    Py_XSETREF(self->fallback_consume, Py_NewRef(consume));
    Py_XSETREF(self->arm_fn, Py_NewRef(arm_fn));
    Py_XSETREF(self->part_fn, Py_NewRef(part_fn));
    Py_XSETREF(self->msg_type, (PyTypeObject *)Py_NewRef(mt));
    self->lease_ns = lease;
    self->doorbell = 1;
    return 0;
}

static int FastConsumer_traverse(FastConsumer *self, visitproc visit, void *arg)
{
    Py_VISIT(self->consumer);
    Py_VISIT(self->fallback);
    Py_VISIT(self->fallback_consume);
    Py_VISIT(self->arm_fn);
    Py_VISIT(self->part_fn);
    Py_VISIT(self->commit_fn);
    Py_VISIT(self->entry_fn);
    Py_VISIT(self->entries);
    Py_VISIT(self->vwords);
    Py_VISIT(self->twords);
    Py_VISIT(self->tp_type);
    Py_VISIT(self->msg_type);
    for (Py_ssize_t i = 0; i < self->nparts; i++) {
        Py_VISIT(self->parts[i].st);
        Py_VISIT(self->parts[i].reader);
    }
    Py_VISIT(self->pend.st);
    Py_VISIT(self->pend.reader);
    return 0;
}

static int FastConsumer_clear(FastConsumer *self)
{
    pend_clear(self);
    parts_free(self);
    Py_CLEAR(self->consumer);
    Py_CLEAR(self->fallback);
    Py_CLEAR(self->fallback_consume);
    Py_CLEAR(self->arm_fn);
    Py_CLEAR(self->part_fn);
    Py_CLEAR(self->commit_fn);
    Py_CLEAR(self->entry_fn);
    Py_CLEAR(self->entries);
    Py_CLEAR(self->vwords);
    Py_CLEAR(self->twords);
    Py_CLEAR(self->tp_type);
    Py_CLEAR(self->msg_type);
    return 0;
}

static void FastConsumer_dealloc(FastConsumer *self)
{
    PyObject_GC_UnTrack(self);
    FastConsumer_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef FastConsumer_methods[] = {
    { "poll", (PyCFunction)(void (*)(void))FastConsumer_poll, METH_FASTCALL | METH_KEYWORDS, "poll(timeout=1.0)" },
    { "consume", (PyCFunction)(void (*)(void))FastConsumer_consume, METH_FASTCALL | METH_KEYWORDS,
      "consume(num_messages=1, timeout=-1)" },
    { "commit", (PyCFunction)(void (*)(void))FastConsumer_commit, METH_FASTCALL | METH_KEYWORDS,
      "commit(message=None, offsets=None, asynchronous=True)" },
    { "take", (PyCFunction)FastConsumer_take, METH_NOARGS, "The pending records as a list; none stay pending." },
    { "drop", (PyCFunction)FastConsumer_drop, METH_NOARGS, "Forget the pending records and disarm." },
    { "disarm", (PyCFunction)FastConsumer_disarm, METH_NOARGS, "The next call re-runs the Python arm function." },
    { "close", (PyCFunction)FastConsumer_close, METH_NOARGS, "Forget every partition." },
    { NULL }
};

static PyMemberDef FastConsumer_members[] = {
    { "pending", T_LONGLONG, offsetof(FastConsumer, pend_n), READONLY, "records of the last read (see pending_at)" },
    { "pending_at", T_LONGLONG, offsetof(FastConsumer, pend_i), READONLY, "records of it already returned" },
    { "fallbacks", T_LONGLONG, offsetof(FastConsumer, fallbacks), READONLY, "calls handed to the Python path" },
    { NULL }
};

static PyTypeObject FastConsumerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmq.native._fastpath.FastConsumer",
    .tp_doc = "FastConsumer(consumer, poll, consume, arm, part, message_type, lease_ns, commit, commit_entry, "
              "topic_partition_type, gen_shift)",
    .tp_basicsize = sizeof(FastConsumer),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)FastConsumer_init,
    .tp_traverse = (traverseproc)FastConsumer_traverse,
    .tp_clear = (inquiry)FastConsumer_clear,
    .tp_dealloc = (destructor)FastConsumer_dealloc,
    .tp_methods = FastConsumer_methods,
    .tp_members = FastConsumer_members,
};

/* --------------------------------------------------------------- bulk
 *
 * The numpy bulk path, one C call each way:
 *
 *   read_arrays   LogReader.read_arrays: shmq_log_read into the reader's
 *                 private buffer (seqlock re-check, CRC by default, the high
 *                 watermark of replicated logs, the reader-table position,
 *                 all as every read), waiting as LogReader._fill does (spin,
 *                 futex with the GIL released, the unblocker for a dead
 *                 claim), then offsets, timestamps, values and keys straight
 *                 into fresh numpy arrays (values and keys 2-D uint8 when
 *                 fixed-width, else lists of bytes / None; keys None when
 *                 every key is null). Records are decoded only from the
 *                 private copy, never from the shared mapping (log_read.c).
 *   append_fixed  Producer.send_batch of a C-contiguous 2-D uint8 array
 *                 (keys likewise, or None): the shmq_records over the
 *                 array's memory and shmq_log_append (batch build, CRC,
 *                 claim, commit), the GIL released.
 *
 * Both return a negative C status instead of raising, so the caller raises
 * through PartitionLog._fail exactly as the Python path does.
 */
static PyObject *np_empty, *np_uint8, *np_int64;

static int numpy_ready(void)
{
    if (np_empty != NULL)
        return 0;
    PyObject *np = PyImport_ImportModule("numpy");
    if (np == NULL)
        return -1;
    PyObject *e = PyObject_GetAttrString(np, "empty"), *u8 = PyObject_GetAttrString(np, "uint8"),
             *i64 = PyObject_GetAttrString(np, "int64");
    Py_DECREF(np);
    if (e == NULL || u8 == NULL || i64 == NULL) {
        Py_XDECREF(e);
        Py_XDECREF(u8);
        Py_XDECREF(i64);
        return -1;
    }
    np_empty = e;
    np_uint8 = u8;
    np_int64 = i64;
    return 0;
}

/* numpy.empty(shape, dtype) with its writable C-contiguous buffer in *b. */
static PyObject *new_array(Py_ssize_t rows, Py_ssize_t cols, PyObject *dtype, Py_buffer *b)
{
    PyObject *shape = cols < 0 ? Py_BuildValue("(n)", rows) : Py_BuildValue("(nn)", rows, cols);
    if (shape == NULL)
        return NULL;
    PyObject *args[2] = { shape, dtype };
    PyObject *arr = PyObject_Vectorcall(np_empty, args, 2, NULL);
    Py_DECREF(shape);
    if (arr == NULL)
        return NULL;
    if (PyObject_GetBuffer(arr, b, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) {
        Py_DECREF(arr);
        return NULL;
    }
    return arr;
}

/* One field (0 value, 1 key) of views[0..n) in buf[0..used): a 2-D uint8
 * array when every record has the same non-negative length, else a list
 * (None for null); Py_None for keys when every key is null. */
static PyObject *gather_field(const uint8_t *buf, int64_t used, const shmq_record_view *views, int64_t n, int field)
{
    int64_t width = field ? views[0].key_len : views[0].value_len;
    int uniform = 1, any = 0;
    for (int64_t k = 0; k < n; k++) {
        int64_t pos = field ? views[k].key_pos : views[k].value_pos;
        int64_t len = field ? views[k].key_len : views[k].value_len;
        if (len >= 0) {
            any = 1;
            if (pos < 0 || len > used || pos > used - len) {
                PyErr_SetString(PyExc_ValueError, "a decoded record points outside the read buffer");
                return NULL;
            }
        }
        if (len != width)
            uniform = 0;
    }
    if (field && !any)
        Py_RETURN_NONE;
    if (uniform && width >= 0) {
        Py_buffer b;
        PyObject *arr = new_array((Py_ssize_t)n, (Py_ssize_t)width, np_uint8, &b);
        if (arr == NULL)
            return NULL;
        uint8_t *out = b.buf;
        Py_BEGIN_ALLOW_THREADS
        for (int64_t k = 0; k < n; k++)
            memcpy(out + k * width, buf + (field ? views[k].key_pos : views[k].value_pos), (size_t)width);
        Py_END_ALLOW_THREADS
        PyBuffer_Release(&b);
        return arr;
    }
    PyObject *list = PyList_New((Py_ssize_t)n);
    if (list == NULL)
        return NULL;
    for (int64_t k = 0; k < n; k++) {
        int64_t pos = field ? views[k].key_pos : views[k].value_pos;
        int64_t len = field ? views[k].key_len : views[k].value_len;
        PyObject *o = len < 0 ? Py_NewRef(Py_None) : PyBytes_FromStringAndSize((const char *)buf + pos,
                                                                             (Py_ssize_t)len);
        if (o == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, (Py_ssize_t)k, o);
    }
    return list;
}

typedef struct {
    shmq_log *h;
    shmq_cursor *cur;
    uint8_t *buf;
    shmq_record_view *views;
    shmq_unblock_state *unblock;
    int64_t buf_len, read_len, nviews, check_crc, max_records, timeout_ns, spin_ns, slice_ns;
    int64_t used;
} BulkRead;

/* LogReader._read_once: past control batches, one frame bigger than read_len. */
static int64_t bulk_read_once(BulkRead *r)
{
    int64_t max = r->max_records < r->nviews ? r->max_records : r->nviews;
    for (;;) {
        int64_t before = r->cur->next_offset;
        int64_t n = shmq_log_read(r->h, r->cur, r->buf, r->read_len, r->views, max, (int)r->check_crc, &r->used);
        if (n == SHMQ_ERR_TOO_LARGE && r->read_len < r->buf_len)
            n = shmq_log_read(r->h, r->cur, r->buf, r->buf_len, r->views, max, (int)r->check_crc, &r->used);
        if (n != 0 || r->cur->next_offset == before)
            return n;
    }
}

/* LogReader._fill without read_committed (the caller keeps that in
 * Python): spin, then the futex in slices, the GIL released; after every
 * empty slice the unblocker pads over a claim whose producer died. NULL
 * (an exception) only when a signal handler raised during a wait. */
static PyObject *bulk_fill(BulkRead *r, int64_t *out)
{
    int64_t n = 0;
    Py_BEGIN_ALLOW_THREADS
    if (r->timeout_ns > 0 || shmq_log_ready(r->h, r->cur))
        n = bulk_read_once(r);
    Py_END_ALLOW_THREADS
    if (n == 0 && r->timeout_ns > 0) {
        int64_t deadline = shmq_now_ns() + r->timeout_ns, spin = r->spin_ns;
        for (;;) {
            int64_t left = deadline - shmq_now_ns();
            if (left <= 0)
                break;
            int64_t slice = left < r->slice_ns ? left : r->slice_ns;
            Py_BEGIN_ALLOW_THREADS
            shmq_log_wait(r->h, r->cur, spin, slice);
            n = bulk_read_once(r);
            if (n == 0) {
                int64_t rc = shmq_log_unblock_cursor(r->h, r->cur, r->unblock);
                if (rc < 0)
                    n = rc;
            }
            Py_END_ALLOW_THREADS
            spin = 0;
            if (n != 0)
                break;
            if (PyErr_CheckSignals() < 0)   /* Ctrl-C ends a long wait */
                return NULL;
        }
    }
    *out = n;
    return Py_None;
}

static int args_int64(PyObject *const *args, Py_ssize_t n, int64_t *out)
{
    for (Py_ssize_t i = 0; i < n; i++) {
        out[i] = PyLong_AsLongLong(args[i]);
        if (out[i] == -1 && PyErr_Occurred())
            return -1;
    }
    return 0;
}

/* read_arrays(record_type, h, cur, buf, buf_len, read_len, views, nviews, check_crc, unblock, spin_ns,
 *             slice_ns, max_records, timeout_ns)
 * -> record_type(offsets, timestamps, values, keys), None (nothing within
 *    the timeout) or a negative C status. */
static PyObject *fp_read_arrays(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 14) {
        PyErr_Format(PyExc_TypeError, "read_arrays takes 14 arguments, got %zd", nargs);
        return NULL;
    }
    PyObject *tp = args[0];
    if (!PyType_Check(tp) || !PyType_IsSubtype((PyTypeObject *)tp, &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "read_arrays: record_type must be a tuple subclass");
        return NULL;
    }
    int64_t a[13];
    if (args_int64(args + 1, 13, a) < 0)
        return NULL;
    BulkRead r = { 0 };
    if (!a[0] || !a[1] || !a[2] || !a[5] || !a[8]) {
        PyErr_SetString(PyExc_ValueError, "read_arrays: a NULL handle");
        return NULL;
    }
    r.h = (shmq_log *)(uintptr_t)a[0];
    r.cur = (shmq_cursor *)(uintptr_t)a[1];
    r.buf = (uint8_t *)(uintptr_t)a[2];
    r.buf_len = a[3];
    r.read_len = a[4];
    r.views = (shmq_record_view *)(uintptr_t)a[5];
    r.nviews = a[6];
    r.check_crc = a[7] != 0;
    r.unblock = (shmq_unblock_state *)(uintptr_t)a[8];
    r.spin_ns = a[9];
    r.slice_ns = a[10];
    r.max_records = a[11];
    r.timeout_ns = a[12];
    if (r.buf_len <= 0 || r.read_len <= 0 || r.read_len > r.buf_len || r.nviews <= 0 || r.slice_ns <= 0 ||
        r.max_records <= 0) {
        PyErr_SetString(PyExc_ValueError, "read_arrays: bad sizes");
        return NULL;
    }
    if (numpy_ready() < 0)
        return NULL;
    int64_t n;
    if (bulk_fill(&r, &n) == NULL)
        return NULL;
    if (n < 0)
        return PyLong_FromLongLong(n);
    if (n == 0)
        Py_RETURN_NONE;
    PyObject *items[4] = { NULL, NULL, NULL, NULL };
    Py_buffer ob, tb;
    items[0] = new_array((Py_ssize_t)n, -1, np_int64, &ob);
    if (items[0] != NULL) {
        items[1] = new_array((Py_ssize_t)n, -1, np_int64, &tb);
        if (items[1] != NULL) {
            int64_t *offs = ob.buf, *ts = tb.buf;
            for (int64_t k = 0; k < n; k++) {
                offs[k] = r.views[k].offset;
                ts[k] = r.views[k].timestamp;
            }
            PyBuffer_Release(&tb);
        }
        PyBuffer_Release(&ob);
    }
    if (items[1] != NULL) {
        items[2] = gather_field(r.buf, r.used, r.views, n, 0);
        if (items[2] != NULL)
            items[3] = gather_field(r.buf, r.used, r.views, n, 1);
    }
    if (items[3] == NULL) {
        for (int i = 0; i < 4; i++)
            Py_XDECREF(items[i]);
        return NULL;
    }
    return new_named((PyTypeObject *)tp, 4, items);
}

/* A C-contiguous 2-D uint8 buffer of obj: rows and width. -1 with
 * TypeError/ValueError otherwise (the caller checked it already: only a
 * misuse of this function gets here). */
static int fixed_rows(PyObject *obj, Py_buffer *b, const char *what)
{
    if (PyObject_GetBuffer(obj, b, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0)
        return -1;
    if (b->ndim != 2 || b->itemsize != 1 || (b->format != NULL && strcmp(b->format, "B") != 0) ||
        b->shape[0] < 1 || b->shape[0] > SHMQ_MAX_RECORDS_PER_SEGMENT) {
        PyBuffer_Release(b);
        PyErr_Format(PyExc_ValueError, "append_fixed: %s must be a C-contiguous 2-D uint8 array of 1 or more rows",
                     what);
        return -1;
    }
    return 0;
}

/* append_fixed(h, values, keys, timestamp_ms, timeout_ns) -> base offset or a negative C status. */
static PyObject *fp_append_fixed(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_Format(PyExc_TypeError, "append_fixed takes 5 arguments, got %zd", nargs);
        return NULL;
    }
    void *h;
    if (as_handle(args[0], &h) < 0)
        return NULL;
    long long ts = PyLong_AsLongLong(args[3]), timeout = PyLong_AsLongLong(args[4]);
    if ((ts == -1 || timeout == -1) && PyErr_Occurred())
        return NULL;
    if (ts < 0) {
        PyErr_SetString(PyExc_ValueError, "append_fixed: timestamp_ms must be >= 0");
        return NULL;
    }
    Py_buffer vb, kb;
    if (fixed_rows(args[1], &vb, "values") < 0)
        return NULL;
    int keys = args[2] != Py_None;
    if (keys && fixed_rows(args[2], &kb, "keys") < 0) {
        PyBuffer_Release(&vb);
        return NULL;
    }
    if (keys && kb.shape[0] != vb.shape[0]) {
        PyBuffer_Release(&vb);
        PyBuffer_Release(&kb);
        PyErr_SetString(PyExc_ValueError, "append_fixed: as many keys as values");
        return NULL;
    }
    shmq_records r;
    memset(&r, 0, sizeof r);
    r.count = (uint32_t)vb.shape[0];
    r.values = vb.buf;
    r.value_width = vb.shape[1];
    if (keys) {
        r.keys = kb.buf;
        r.key_width = kb.shape[1];
    }
    r.base_timestamp = ts;
    int64_t off;
    Py_BEGIN_ALLOW_THREADS
    off = shmq_log_append((shmq_log *)h, &r, NULL, timeout);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&vb);
    if (keys)
        PyBuffer_Release(&kb);
    return PyLong_FromLongLong(off);
}

static PyMethodDef module_methods[] = {
    { "read_arrays", (PyCFunction)(void (*)(void))fp_read_arrays, METH_FASTCALL,
      "read_arrays(record_type, h, cur, buf, buf_len, read_len, views, nviews, check_crc, unblock, spin_ns, "
      "slice_ns, max_records, timeout_ns): a bulk read into numpy arrays (see fastpath.c)" },
    { "append_fixed", (PyCFunction)(void (*)(void))fp_append_fixed, METH_FASTCALL,
      "append_fixed(h, values, keys, timestamp_ms, timeout_ns): one RecordBatch of a 2-D uint8 array" },
    { NULL }
};

/* -------------------------------------------------------------- module */

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "shmq.native._fastpath",
    "The per-record path of shmq in C (see fastpath.c); the cffi module binds the rest.", -1, module_methods,
};

PyMODINIT_FUNC PyInit__fastpath(void)
{
    if (!(s_partition = PyUnicode_InternFromString("partition")) ||
        !(s_headers = PyUnicode_InternFromString("headers")) ||
        !(s_timestamp_ms = PyUnicode_InternFromString("timestamp_ms")) ||
        !(s_value = PyUnicode_InternFromString("value")) || !(s_key = PyUnicode_InternFromString("key")) ||
        !(s_position = PyUnicode_InternFromString("position")) ||
        !(s_buffer_tp = PyUnicode_InternFromString("_buffer_tp")) ||
        !(s_timeout = PyUnicode_InternFromString("timeout")) ||
        !(s_num_messages = PyUnicode_InternFromString("num_messages")) ||
        !(s_read_failed = PyUnicode_InternFromString("_read_failed")))
        return NULL;
    PyTypeObject *types[] = { &PartitionerType, &RouteType, &FastProducerType, &FastConsumerType };
    for (size_t i = 0; i < sizeof types / sizeof *types; i++)
        if (PyType_Ready(types[i]) < 0)
            return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "Partitioner", (PyObject *)&PartitionerType) < 0 ||
        PyModule_AddObjectRef(m, "FastProducer", (PyObject *)&FastProducerType) < 0 ||
        PyModule_AddObjectRef(m, "FastConsumer", (PyObject *)&FastConsumerType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
