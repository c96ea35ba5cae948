/* Batch ChaCha20-Poly1305 for WireGuard transport messages (uspan.wg.transport_crypto),
 * and the padding strip of what they carry.
 *
 * Why: one pyca/cryptography call per packet costs a new OpenSSL context (~2.5k
 * instructions) plus the Python loop around it. Here a key object keeps one context
 * with its key set once; each message only re-initialises the nonce. A batch's output
 * bytes are allocated with the GIL held, then all the crypto runs with the GIL released,
 * so another thread may run the batch while the event loop goes on.
 * The transport message's layout and sealing: _transport.h (shared with the plane).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <limits.h>
#include <string.h>
#include <openssl/evp.h>

#include "_transport.h" /* the message layout, padding, seal_one and open_one */

#define STACK_BATCH 256 /* open's per-message results live on the stack up to this */

static EVP_CIPHER *chacha20_poly1305; /* fetched once per process */

typedef struct {
    PyObject_HEAD
    EVP_CIPHER_CTX *ctx; /* the key is set once; messages set only the nonce */
    int busy;            /* a call is running with the GIL released */
} Aead;

static int
aead_init(Aead *self, PyObject *args, PyObject *kwds, int encrypt)
{
    static char *kwlist[] = {"key", NULL};
    Py_buffer key;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*", kwlist, &key))
        return -1;
    if (key.len != KEY_SIZE) {
        PyBuffer_Release(&key);
        PyErr_SetString(PyExc_ValueError, "key must be 32 bytes");
        return -1;
    }
    if (self->busy) {
        PyBuffer_Release(&key);
        PyErr_SetString(PyExc_RuntimeError, "key object in use");
        return -1;
    }
    /* Set up a new context first: a failure leaves the old one (or none), never a
     * context without a key. Freeing the old one cleanses its key. */
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    int ok = ctx != NULL
             && EVP_CipherInit_ex2(ctx, chacha20_poly1305, key.buf, NULL, encrypt, NULL);
    PyBuffer_Release(&key);
    if (!ok) {
        EVP_CIPHER_CTX_free(ctx);
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL could not set up ChaCha20-Poly1305");
        return -1;
    }
    EVP_CIPHER_CTX_free(self->ctx);
    self->ctx = ctx;
    return 0;
}

static int
sealer_init(Aead *self, PyObject *args, PyObject *kwds)
{
    return aead_init(self, args, kwds, 1);
}

static int
opener_init(Aead *self, PyObject *args, PyObject *kwds)
{
    return aead_init(self, args, kwds, 0);
}

static void
aead_dealloc(Aead *self)
{
    /* The provider's context is cleansed (OPENSSL_clear_free) before it is freed. */
    EVP_CIPHER_CTX_free(self->ctx);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Claim the context for one call; NULL (with an exception) if it cannot run. */
static EVP_CIPHER_CTX *
aead_claim(Aead *self)
{
    if (self->ctx == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "key object not initialised");
        return NULL;
    }
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "key object in use by another thread");
        return NULL;
    }
    self->busy = 1;
    return self->ctx;
}

/* Copy ``item`` (bytes or any buffer) after a header into a new datagram, zero-padded. */
static PyObject *
new_datagram(PyObject *item, uint32_t index, uint64_t counter, Py_ssize_t mtu)
{
    Py_buffer view;
    if (PyObject_GetBuffer(item, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    Py_ssize_t padded = mtu < 0 ? view.len : (Py_ssize_t)padded_length((size_t)view.len, (size_t)mtu);
    PyObject *datagram = NULL;
    if (padded > INT_MAX - HEADER_SIZE - TAG_SIZE)
        PyErr_SetString(PyExc_OverflowError, "packet too large");
    else
        datagram = PyBytes_FromStringAndSize(NULL, HEADER_SIZE + padded + TAG_SIZE);
    if (datagram != NULL) {
        unsigned char *out = (unsigned char *)PyBytes_AS_STRING(datagram);
        put_le32(out, MSG_TRANSPORT);
        put_le32(out + 4, index);
        put_le64(out + 8, counter);
        memcpy(out + HEADER_SIZE, view.buf, view.len);
        memset(out + HEADER_SIZE + view.len, 0, padded - view.len);
    }
    PyBuffer_Release(&view);
    return datagram;
}

PyDoc_STRVAR(seal_doc,
"seal(index, counter, packets, mtu) -> list of transport datagrams\n\n"
"Packet i is padded and sealed with counter + i for receiver ``index``.");

static PyObject *
sealer_seal(Aead *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "seal takes index, counter, packets and mtu");
        return NULL;
    }
    unsigned long index = PyLong_AsUnsignedLong(args[0]);
    if (index == (unsigned long)-1 && PyErr_Occurred())
        return NULL;
    if (index > 0xffffffffUL) {
        PyErr_SetString(PyExc_OverflowError, "index is not a u32");
        return NULL;
    }
    unsigned long long counter = PyLong_AsUnsignedLongLong(args[1]);
    if (counter == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t mtu = PyLong_AsSsize_t(args[3]);
    if (mtu == -1 && PyErr_Occurred())
        return NULL;
    /* A tuple of our own: reading an item's buffer may run Python code (PEP 688) that
     * must not change what is iterated. */
    PyObject *packets = PySequence_Tuple(args[2]);
    if (packets == NULL)
        return NULL;
    Py_ssize_t count = PyTuple_GET_SIZE(packets);
    if (count > 0 && (unsigned long long)(count - 1) > ULLONG_MAX - counter) {
        Py_DECREF(packets);
        PyErr_SetString(PyExc_OverflowError, "counter would wrap");
        return NULL;
    }
    PyObject *datagrams = PyList_New(count);
    for (Py_ssize_t i = 0; datagrams != NULL && i < count; i++) {
        PyObject *datagram = new_datagram(PyTuple_GET_ITEM(packets, i),
                                          (uint32_t)index, counter + (uint64_t)i, mtu);
        if (datagram == NULL)
            Py_CLEAR(datagrams);
        else
            PyList_SET_ITEM(datagrams, i, datagram);
    }
    Py_DECREF(packets);
    if (datagrams == NULL)
        return NULL;
    EVP_CIPHER_CTX *ctx = aead_claim(self);
    if (ctx == NULL) {
        Py_DECREF(datagrams);
        return NULL;
    }
    int ok = 1;
    /* The datagrams are ours alone until returned: safe to fill without the GIL. */
    Py_BEGIN_ALLOW_THREADS
    unsigned char nonce[NONCE_SIZE] = {0};
    for (Py_ssize_t i = 0; ok && i < count; i++) {
        PyObject *datagram = PyList_GET_ITEM(datagrams, i);
        unsigned char *out = (unsigned char *)PyBytes_AS_STRING(datagram);
        memcpy(nonce + 4, out + 8, 8);
        ok = seal_one(ctx, nonce, out + HEADER_SIZE,
                      (int)(PyBytes_GET_SIZE(datagram) - HEADER_SIZE - TAG_SIZE));
    }
    Py_END_ALLOW_THREADS
    self->busy = 0;
    if (!ok) {
        Py_DECREF(datagrams);
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL failed to seal");
        return NULL;
    }
    return datagrams;
}

/* ``datagrams`` as a tuple of bytes (a list could change while the GIL is released). */
static PyObject *
bytes_tuple(PyObject *datagrams)
{
    /* A tuple of our own first: PyBytes_FromObject may run Python code (an item's
     * __iter__ or __buffer__) that must not change what is iterated. */
    PyObject *items = PySequence_Tuple(datagrams);
    if (items == NULL)
        return NULL;
    Py_ssize_t count = PyTuple_GET_SIZE(items);
    PyObject *tuple = PyTuple_New(count);
    for (Py_ssize_t i = 0; tuple != NULL && i < count; i++) {
        PyObject *item = PyTuple_GET_ITEM(items, i);
        if (PyBytes_CheckExact(item))
            Py_INCREF(item);
        else
            item = PyBytes_FromObject(item);
        if (item == NULL)
            Py_CLEAR(tuple);
        else if (PyBytes_GET_SIZE(item) < HEADER_SIZE + TAG_SIZE
                 || PyBytes_GET_SIZE(item) > INT_MAX) {
            Py_DECREF(item);
            Py_CLEAR(tuple);
            PyErr_SetString(PyExc_ValueError, "not a transport message's length");
        }
        else
            PyTuple_SET_ITEM(tuple, i, item);
    }
    Py_DECREF(items);
    return tuple;
}

PyDoc_STRVAR(open_doc,
"open(datagrams) -> list of plaintext, or None where the tag is wrong\n\n"
"Each datagram is a whole transport message (header, ciphertext, tag) of this key;\n"
"the counter is read from its header. Padding is left on the plaintext.");

static PyObject *
opener_open(Aead *self, PyObject *arg)
{
    PyObject *messages = bytes_tuple(arg);
    if (messages == NULL)
        return NULL;
    Py_ssize_t count = PyTuple_GET_SIZE(messages);
    unsigned char stack_ok[STACK_BATCH];
    unsigned char *ok = count <= STACK_BATCH ? stack_ok : PyMem_Malloc(count);
    PyObject *plains = ok == NULL ? PyErr_NoMemory() : PyList_New(count);
    for (Py_ssize_t i = 0; plains != NULL && i < count; i++) {
        Py_ssize_t length = PyBytes_GET_SIZE(PyTuple_GET_ITEM(messages, i));
        PyObject *plain = PyBytes_FromStringAndSize(NULL, length - HEADER_SIZE - TAG_SIZE);
        if (plain == NULL)
            Py_CLEAR(plains);
        else
            PyList_SET_ITEM(plains, i, plain);
    }
    EVP_CIPHER_CTX *ctx = plains == NULL ? NULL : aead_claim(self);
    if (ctx != NULL) {
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t i = 0; i < count; i++) {
            PyObject *message = PyTuple_GET_ITEM(messages, i);
            ok[i] = (unsigned char)open_one(
                ctx, (const unsigned char *)PyBytes_AS_STRING(message),
                (int)(PyBytes_GET_SIZE(message) - HEADER_SIZE - TAG_SIZE),
                (unsigned char *)PyBytes_AS_STRING(PyList_GET_ITEM(plains, i)));
        }
        Py_END_ALLOW_THREADS
        self->busy = 0;
        for (Py_ssize_t i = 0; i < count; i++) {
            if (!ok[i]) /* a forgery's bytes are dropped unseen */
                PyList_SetItem(plains, i, Py_NewRef(Py_None));
        }
    }
    else
        Py_CLEAR(plains);
    if (ok != stack_ok)
        PyMem_Free(ok);
    Py_DECREF(messages);
    return plains;
}

PyDoc_STRVAR(strip_doc,
"strip(plaintexts) -> (packets, source) or None\n\n"
"The IP packets in non-empty transport plaintexts without their padding, and the one\n"
"inner source address they all carry; None if one is not a whole IPv4 or IPv6 packet\n"
"or their sources differ (the caller then checks them one by one).");

static PyObject *
strip(PyObject *module, PyObject *plaintexts)
{
    if (!PyList_CheckExact(plaintexts)) {
        PyErr_SetString(PyExc_TypeError, "plaintexts must be a list");
        return NULL;
    }
    Py_ssize_t count = PyList_GET_SIZE(plaintexts);
    const unsigned char *source = NULL;
    Py_ssize_t source_size = 0;
    PyObject *packets = PyList_New(count);
    for (Py_ssize_t i = 0; packets != NULL && i < count; i++) {
        PyObject *plaintext = PyList_GET_ITEM(plaintexts, i);
        if (!PyBytes_CheckExact(plaintext))
            goto one_by_one;
        const unsigned char *data = (const unsigned char *)PyBytes_AS_STRING(plaintext);
        Py_ssize_t size = PyBytes_GET_SIZE(plaintext), total, minimum, address_size;
        const unsigned char *address;
        int version = size ? data[0] >> 4 : 0;
        if (version == 4 && size >= 20) {
            total = (data[2] << 8) | data[3];
            minimum = 20, address = data + 12, address_size = 4;
        }
        else if (version == 6 && size >= 40) {
            total = 40 + ((data[4] << 8) | data[5]);
            minimum = 40, address = data + 8, address_size = 16;
        }
        else
            goto one_by_one;
        if (total > size || total < minimum)
            goto one_by_one;
        if (source == NULL)
            source = address, source_size = address_size;
        else if (address_size != source_size || memcmp(address, source, source_size) != 0)
            goto one_by_one;
        PyObject *packet = total == size ? Py_NewRef(plaintext)
                                         : PyBytes_FromStringAndSize((const char *)data, total);
        if (packet == NULL)
            Py_CLEAR(packets);
        else
            PyList_SET_ITEM(packets, i, packet);
    }
    if (packets == NULL)
        return NULL;
    if (source == NULL) /* nothing to deliver */
        goto one_by_one;
    return Py_BuildValue("(Ny#)", packets, (const char *)source, source_size);
one_by_one:
    Py_XDECREF(packets);
    Py_RETURN_NONE;
}


/* Append (address, count) to ``runs``; -1 with an exception on failure. */
static int
add_run(PyObject *runs, const unsigned char *address, Py_ssize_t size, Py_ssize_t count)
{
    PyObject *run = Py_BuildValue("(y#n)", (const char *)address, size, count);
    int failed = run == NULL || PyList_Append(runs, run) < 0;
    Py_XDECREF(run);
    return failed ? -1 : 0;
}

PyDoc_STRVAR(inner_runs_doc,
"inner_runs(packets) -> [(destination, count)]\n\n"
"Consecutive IP packets to one inner destination address as one run, so routing is\n"
"per run, not per packet; destination b\"\" for packets too short for an IPv4 or IPv6\n"
"header (dropped).");

static PyObject *
inner_runs(PyObject *module, PyObject *packets)
{
    if (!PyList_CheckExact(packets)) {
        PyErr_SetString(PyExc_TypeError, "packets must be a list");
        return NULL;
    }
    PyObject *runs = PyList_New(0);
    unsigned char last[16], address[16];
    Py_ssize_t last_size = -1, count = 0;
    for (Py_ssize_t i = 0; runs != NULL && i < PyList_GET_SIZE(packets); i++) {
        PyObject *item = PyList_GET_ITEM(packets, i);
        const unsigned char *found = NULL;
        Py_ssize_t size;
        if (PyBytes_CheckExact(item)) {
            size = inner_address((const unsigned char *)PyBytes_AS_STRING(item),
                                 (size_t)PyBytes_GET_SIZE(item), 0, &found);
            memcpy(address, found ? found : last, (size_t)size);
        }
        else {
            /* Reading a buffer may run Python code that changes the list: hold the item
             * and copy its address out at once. */
            Py_buffer view;
            Py_INCREF(item);
            int got = PyObject_GetBuffer(item, &view, PyBUF_SIMPLE);
            Py_DECREF(item);
            if (got < 0) {
                Py_CLEAR(runs);
                break;
            }
            size = inner_address(view.buf, (size_t)view.len, 0, &found);
            memcpy(address, found ? found : last, (size_t)size);
            PyBuffer_Release(&view);
        }
        if (size == last_size && memcmp(address, last, (size_t)size) == 0) {
            count++;
            continue;
        }
        if (count && add_run(runs, last, last_size, count) < 0) {
            Py_CLEAR(runs);
            break;
        }
        memcpy(last, address, (size_t)size);
        last_size = size, count = 1;
    }
    if (runs != NULL && count && add_run(runs, last, last_size, count) < 0)
        Py_CLEAR(runs);
    return runs;
}

/* What ``transport_runs`` builds: the runs so far and the one being added to. */
typedef struct {
    PyObject *runs, *messages, *sources;
    uint32_t index;
    uint64_t first, next;
    int in_order, ended; /* ended: the last counter was 2**64 - 1, none follows it */
} Runs;

/* Close the open run (if any) into ``runs``; -1 with an exception on failure. */
static int
close_run(Runs *r)
{
    if (r->messages == NULL)
        return 0;
    PyObject *run = Py_BuildValue("(kNNKO)", (unsigned long)r->index, r->messages,
                                  r->sources, (unsigned long long)r->first,
                                  r->in_order ? Py_True : Py_False);
    r->messages = r->sources = NULL; /* Py_BuildValue's N took them, even on failure */
    int failed = run == NULL || PyList_Append(r->runs, run) < 0;
    Py_XDECREF(run);
    return failed ? -1 : 0;
}

PyDoc_STRVAR(transport_runs_doc,
"transport_runs(datagrams) -> (runs, handshakes, bad_length, bad_type)\n\n"
"Sorts received (data, source) pairs as Device.receive needs them, in one pass:\n"
"consecutive transport messages to one receiver index as a run (index, messages,\n"
"sources, first counter, in order: the counters are first, first + 1, ... and every\n"
"source is one object), the handshake messages' pairs, and counts of what is dropped:\n"
"too short for its type, or of no known type.");

static PyObject *
transport_runs(PyObject *module, PyObject *datagrams)
{
    if (!PyList_CheckExact(datagrams)) {
        PyErr_SetString(PyExc_TypeError, "datagrams must be a list");
        return NULL;
    }
    Runs r = {PyList_New(0), NULL, NULL, 0, 0, 0, 0, 0};
    PyObject *handshakes = PyList_New(0);
    Py_ssize_t bad_length = 0, bad_type = 0;
    int failed = r.runs == NULL || handshakes == NULL;
    for (Py_ssize_t i = 0; !failed && i < PyList_GET_SIZE(datagrams); i++) {
        PyObject *pair = PyList_GET_ITEM(datagrams, i);
        /* Unpacked as ``data, source = pair`` would: an exact tuple as it is, any other
         * pair (a NamedTuple, a list) through a tuple of its items. Both held: reading
         * it or a buffer may run Python code that changes the list. */
        Py_INCREF(pair);
        PyObject *items = PySequence_Tuple(pair);
        if (items == NULL || PyTuple_GET_SIZE(items) != 2) {
            if (items != NULL)
                PyErr_Format(PyExc_ValueError,
                             "a datagram is a (data, source) pair, not %zd items",
                             PyTuple_GET_SIZE(items));
            Py_XDECREF(items);
            Py_DECREF(pair);
            failed = 1;
            break;
        }
        PyObject *data = PyTuple_GET_ITEM(items, 0), *source = PyTuple_GET_ITEM(items, 1);
        Py_buffer view;
        if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0) {
            Py_DECREF(items);
            Py_DECREF(pair);
            failed = 1;
            break;
        }
        const unsigned char *bytes = view.buf;
        Py_ssize_t length = view.len;
        int zeros = length >= 4 && bytes[1] == 0 && bytes[2] == 0 && bytes[3] == 0;
        int kind = zeros ? bytes[0] : -1;
        uint32_t index = 0;
        uint64_t counter = 0;
        if (kind == MSG_TRANSPORT && length >= HEADER_SIZE + TAG_SIZE) {
            index = (uint32_t)bytes[4] | (uint32_t)bytes[5] << 8 | (uint32_t)bytes[6] << 16
                    | (uint32_t)bytes[7] << 24;
            counter = get_le64(bytes + 8);
        }
        else if (kind == MSG_TRANSPORT || length < 4)
            bad_length++, kind = 0;
        else if (kind < 1 || kind > 3)
            bad_type++, kind = 0;
        PyBuffer_Release(&view);
        if (kind == MSG_TRANSPORT) {
            if (r.messages == NULL || index != r.index) {
                failed = close_run(&r) < 0;
                r.messages = PyList_New(0);
                r.sources = PyList_New(0);
                r.index = index, r.first = counter, r.next = counter, r.in_order = 1;
                r.ended = 0;
                failed = failed || r.messages == NULL || r.sources == NULL;
            }
            if (!failed) {
                r.in_order = r.in_order && !r.ended && counter == r.next
                             && (PyList_GET_SIZE(r.sources) == 0
                                 || PyList_GET_ITEM(r.sources, 0) == source);
                r.ended = counter == UINT64_MAX;
                r.next = counter + 1;
                failed = PyList_Append(r.messages, data) < 0
                         || PyList_Append(r.sources, source) < 0;
            }
        }
        else if (kind)
            failed = PyList_Append(handshakes, pair) < 0;
        Py_DECREF(items);
        Py_DECREF(pair);
    }
    if (!failed)
        failed = close_run(&r) < 0;
    if (failed) {
        Py_XDECREF(r.messages);
        Py_XDECREF(r.sources);
        Py_XDECREF(r.runs);
        Py_XDECREF(handshakes);
        return NULL;
    }
    return Py_BuildValue("(NNnn)", r.runs, handshakes, bad_length, bad_type);
}

static PyMethodDef module_methods[] = {
    {"transport_runs", (PyCFunction)transport_runs, METH_O, transport_runs_doc},
    {"inner_runs", (PyCFunction)inner_runs, METH_O, inner_runs_doc},
    {"strip", (PyCFunction)strip, METH_O, strip_doc},
    {NULL, NULL, 0, NULL},
};

static PyMethodDef sealer_methods[] = {
    {"seal", (PyCFunction)(void (*)(void))sealer_seal, METH_FASTCALL, seal_doc},
    {NULL, NULL, 0, NULL},
};

static PyMethodDef opener_methods[] = {
    {"open", (PyCFunction)opener_open, METH_O, open_doc},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject SealerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "uspan.wg._aead.Sealer",
    .tp_doc = PyDoc_STR("Sealer(key): seals batches of transport messages with one key."),
    .tp_basicsize = sizeof(Aead),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)sealer_init,
    .tp_dealloc = (destructor)aead_dealloc,
    .tp_methods = sealer_methods,
};

static PyTypeObject OpenerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "uspan.wg._aead.Opener",
    .tp_doc = PyDoc_STR("Opener(key): opens batches of transport messages with one key."),
    .tp_basicsize = sizeof(Aead),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)opener_init,
    .tp_dealloc = (destructor)aead_dealloc,
    .tp_methods = opener_methods,
};

static struct PyModuleDef aead_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "uspan.wg._aead",
    .m_doc = "Batch ChaCha20-Poly1305 for WireGuard transport messages (OpenSSL).",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC
PyInit__aead(void)
{
    chacha20_poly1305 = EVP_CIPHER_fetch(NULL, "ChaCha20-Poly1305", NULL);
    if (chacha20_poly1305 == NULL) {
        PyErr_SetString(PyExc_ImportError, "OpenSSL has no ChaCha20-Poly1305");
        return NULL;
    }
    if (PyType_Ready(&SealerType) < 0 || PyType_Ready(&OpenerType) < 0)
        return NULL;
    PyObject *module = PyModule_Create(&aead_module);
    if (module == NULL)
        return NULL;
    if (PyModule_AddObjectRef(module, "Sealer", (PyObject *)&SealerType) < 0
        || PyModule_AddObjectRef(module, "Opener", (PyObject *)&OpenerType) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
