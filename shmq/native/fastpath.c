/*
 * The per-record front door: a CPython C-API extension (METH_FASTCALL) over
 * the same C core that cffi binds. It carries only the hot path:
 *
 *   Partitioner        Kafka's placements (murmur2 as the Java client, sticky
 *                      or round-robin for null keys); shared by both paths.
 *   Producer.send      the common case in one C call: route lookup, partition,
 *                      timestamp, header encoding, shmq_log_append1 (batch
 *                      build, CRC, claim, commit) and the RecordMetadata.
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
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "log.h"
#include "record_batch.h"

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

/* One topic as the fast send sees it. Immutable once built. */
typedef struct {
    PyObject_HEAD
    PyObject *logs;        /* tuple of PartitionLog (keeps the handles mapped; errors go to their _fail) */
    int64_t max_bytes;
    Py_ssize_t count;
    shmq_log *handles[1];  /* count of them */
} Route;

static void Route_dealloc(Route *self)
{
    Py_XDECREF(self->logs);
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
    PyObject *fallback;      /* the Python send: every case not handled here */
    PyObject *route_fn;      /* route_fn(topic) -> (handles, logs, max_bytes) or None */
    Partitioner *partitioner;
    PyTypeObject *md_type;   /* RecordMetadata */
    int64_t timeout_ns;      /* max_block_ms */
    int64_t recheck_ms;      /* routes are dropped (metadata re-checked) once the wall clock passes this */
    int64_t recheck_every_ms;
    long long fallbacks;     /* sends handed to the Python path (tests look) */
    int closed;
} FastProducer;

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

/* The route of topic: cached, else built from route_fn. Returns a borrowed
 * Route, Py_None (the Python path), or NULL with an exception. */
static PyObject *route_of(FastProducer *self, PyObject *topic)
{
    PyObject *r = PyDict_GetItemWithError(self->routes, topic);
    if (r != NULL || PyErr_Occurred())
        return r;
    PyObject *info = PyObject_CallOneArg(self->route_fn, topic);
    if (info == NULL)
        return NULL;
    PyObject *value = Py_None;
    Route *route = NULL;
    if (info != Py_None) {
        PyObject *handles, *logs;
        long long max_bytes;
        if (!PyArg_ParseTuple(info, "O!O!L", &PyTuple_Type, &handles, &PyTuple_Type, &logs, &max_bytes))
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
        route->max_bytes = max_bytes;
        route->count = n;
        for (Py_ssize_t i = 0; i < n; i++)
            if (as_handle(PyTuple_GET_ITEM(handles, i), (void **)&route->handles[i]) < 0)
                goto fail;
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
        PyDict_Clear(self->routes);
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
    /* First without waiting, holding the GIL (the common case: room in the
     * ring); a full ring is waited for with the GIL released. */
    int64_t off = shmq_log_append1(log, kp, klen, vp, vlen, hp, hlen, ts, NULL, 0);
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
    if (self->routes != NULL)
        PyDict_Clear(self->routes);
    Py_RETURN_NONE;
}

static PyObject *FastProducer_invalidate(FastProducer *self, PyObject *unused)
{
    if (self->routes != NULL)
        PyDict_Clear(self->routes);
    Py_RETURN_NONE;
}

static int FastProducer_traverse(FastProducer *self, visitproc visit, void *arg)
{
    Py_VISIT(self->routes);
    Py_VISIT(self->fallback);
    Py_VISIT(self->route_fn);
    Py_VISIT(self->partitioner);
    Py_VISIT(self->md_type);
    return 0;
}

static int FastProducer_clear(FastProducer *self)
{
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

/* -------------------------------------------------------------- module */

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "shmq.native._fastpath",
    "The per-record path of shmq in C (see fastpath.c); the cffi module binds the rest.", -1, NULL,
};

PyMODINIT_FUNC PyInit__fastpath(void)
{
    if (!(s_partition = PyUnicode_InternFromString("partition")) ||
        !(s_headers = PyUnicode_InternFromString("headers")) ||
        !(s_timestamp_ms = PyUnicode_InternFromString("timestamp_ms")) ||
        !(s_value = PyUnicode_InternFromString("value")) || !(s_key = PyUnicode_InternFromString("key")))
        return NULL;
    PyTypeObject *types[] = { &PartitionerType, &RouteType, &FastProducerType };
    for (size_t i = 0; i < sizeof types / sizeof *types; i++)
        if (PyType_Ready(types[i]) < 0)
            return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "Partitioner", (PyObject *)&PartitionerType) < 0 ||
        PyModule_AddObjectRef(m, "FastProducer", (PyObject *)&FastProducerType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
