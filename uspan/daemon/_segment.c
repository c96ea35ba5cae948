/* The Python binding of uspan/csrc/segment.c (TSO/USO splitting and the GRO merge, see
 * segment.h) for uspan.daemon.gso, and the two helpers that only move Python objects:
 * gso_batches and split_gro in C.
 *
 * split(packet, ip_len, hdr_len, step, v6, tcp) does what gso._split does after its
 * checks (which stay in Python, with their OffloadError messages). coalesce(packets, udp)
 * takes the same decisions as gso._coalesce_python and builds the same bytes. Both
 * allocate their output objects with the GIL held and do the library's work (the merge
 * plan, checksums, copies) with it released.
 *
 * Why batches and split_gro: gso_batches' Python loop cost ~2.1k instructions per
 * datagram sent, split_gro's slices ~3k per datagram received (with the pairing);
 * batches(datagrams, max_bytes, max_segments) takes its decisions and joins its buffers,
 * split_gro(data, gso_size) copies each datagram out once.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <sys/random.h>

#include "../csrc/segment.h"

/* The flow hash's seed for every merge workspace, random per process (segment.h). */
static uint32_t hash_seed;

PyDoc_STRVAR(split_doc,
"split(packet, ip_len, hdr_len, step, v6, tcp, /) -> list[bytes]\n\n"
"The segments of a checked TSO/USO super-segment (what uspan.daemon.gso._split\n"
"builds after its checks): payload chunks of step bytes, each with its own headers\n"
"and checksums.");

/* Segments built per library call: a 64 KiB super-segment is rarely more. */
#define SPLIT_BATCH 64

static PyObject *
split(PyObject *module, PyObject *args)
{
    Py_buffer packet;
    Py_ssize_t ip_len, hdr_len, step;
    int v6, tcp;
    if (!PyArg_ParseTuple(args, "y*nnnpp:split", &packet, &ip_len, &hdr_len, &step,
                           &v6, &tcp))
        return NULL;
    /* Python checks all this with its own messages; here it only guards memory. */
    seg_split s;
    if (ip_len < 0 || hdr_len < 0 || step <= 0
        || seg_split_init(&s, packet.buf, (size_t)packet.len, (size_t)ip_len, (size_t)hdr_len,
                          (size_t)step, v6, tcp) < 0) {
        PyBuffer_Release(&packet);
        PyErr_SetString(PyExc_ValueError, "split: inconsistent header lengths");
        return NULL;
    }
    PyObject *out = PyList_New((Py_ssize_t)s.count);
    if (out == NULL) {
        PyBuffer_Release(&packet);
        return NULL;
    }
    for (size_t i = 0; i < s.count; i++) {
        PyObject *item = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)seg_split_len(&s, i));
        if (item == NULL) {
            Py_DECREF(out);
            PyBuffer_Release(&packet);
            return NULL;
        }
        PyList_SET_ITEM(out, (Py_ssize_t)i, item);
    }
    /* Nothing else holds the new bytes; the exported packet cannot be resized. */
    Py_BEGIN_ALLOW_THREADS
    unsigned char *into[SPLIT_BATCH];
    for (size_t first = 0; first < s.count; first += SPLIT_BATCH) {
        size_t n = s.count - first < SPLIT_BATCH ? s.count - first : SPLIT_BATCH;
        for (size_t i = 0; i < n; i++)
            into[i] = (unsigned char *)PyBytes_AS_STRING(
                PyList_GET_ITEM(out, (Py_ssize_t)(first + i)));
        seg_split_build(&s, first, n, into);
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&packet);
    return out;
}

/* --- coalesce ------------------------------------------------------------------------ */

static PyObject *vnet_none;  /* 10 zero bytes: GSO_NONE, the kernel checks the packet */

/* A new list of the items of ``sequence`` as bytes (other buffers copied): a list of
 * our own first, since converting an item may run Python code. */
static PyObject *
bytes_list(PyObject *sequence)
{
    PyObject *list = PySequence_List(sequence);
    for (Py_ssize_t i = 0; list != NULL && i < PyList_GET_SIZE(list); i++) {
        PyObject *item = PyList_GET_ITEM(list, i);
        if (!PyBytes_CheckExact(item)) {
            PyObject *copy = PyBytes_FromObject(item);
            if (copy == NULL)
                Py_CLEAR(list);
            else {
                PyList_SET_ITEM(list, i, copy);
                Py_DECREF(item);
            }
        }
    }
    return list;
}

PyDoc_STRVAR(coalesce_doc,
"coalesce(packets, udp, /) -> list[tuple[bytes, bytes]]\n\n"
"The (virtio_net_hdr, packet) pairs uspan.daemon.gso.coalesce writes for packets:\n"
"consecutive segments of each flow merged into GSO super-segments by GRO's rules.");

static PyObject *
coalesce(PyObject *module, PyObject *args)
{
    PyObject *sequence, *out = NULL;
    int udp;
    if (!PyArg_ParseTuple(args, "Op:coalesce", &sequence, &udp))
        return NULL;
    /* The list keeps the bytes alive (and bytes do not change) until we return. */
    PyObject *list = bytes_list(sequence);
    if (list == NULL)
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(list);
    /* One block: the packets' buffers, then the library's workspace (after a whole
     * number of seg_buf, so aligned for its pointers and sizes). */
    size_t count = (size_t)n, buffers_bytes = (count ? count : 1) * sizeof(seg_buf);
    size_t workspace = seg_merge_bytes(count);
    void *memory = workspace ? PyMem_Malloc(buffers_bytes + workspace) : NULL;
    if (memory == NULL) {
        Py_DECREF(list);
        return PyErr_NoMemory();
    }
    seg_buf *buffers = memory;
    seg_merge *merge = seg_merge_init((char *)memory + buffers_bytes, count, hash_seed);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyList_GET_ITEM(list, i);
        buffers[i].data = (unsigned char *)PyBytes_AS_STRING(item);
        buffers[i].size = (size_t)PyBytes_GET_SIZE(item);
    }
    ptrdiff_t n_items;
    Py_BEGIN_ALLOW_THREADS
    n_items = seg_merge_plan(merge, buffers, count, udp);
    Py_END_ALLOW_THREADS
    out = n_items < 0 ? PyErr_NoMemory() : PyList_New(n_items);  /* < 0: never, n fits */
    if (out == NULL)
        goto done;
    for (Py_ssize_t k = 0; k < n_items; k++) {
        seg_item item = seg_merge_item(merge, (size_t)k);
        PyObject *pair = NULL;
        if (item.count == 1) {
            pair = PyTuple_Pack(2, vnet_none, PyList_GET_ITEM(list, (Py_ssize_t)item.packet));
        } else {  /* the merged bytes are filled in below */
            unsigned char header[SEG_VNET_HDR_LEN];
            seg_merge_vnet(merge, (size_t)k, header);
            PyObject *vnet = PyBytes_FromStringAndSize((const char *)header, SEG_VNET_HDR_LEN);
            PyObject *merged = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)item.size);
            if (vnet != NULL && merged != NULL)
                pair = PyTuple_Pack(2, vnet, merged);
            Py_XDECREF(vnet);
            Py_XDECREF(merged);
        }
        if (pair == NULL) {
            Py_CLEAR(out);
            goto done;
        }
        PyList_SET_ITEM(out, k, pair);
    }
    /* Only this function holds the new bytes yet. */
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t k = 0; k < n_items; k++) {
        PyObject *merged = PyTuple_GET_ITEM(PyList_GET_ITEM(out, k), 1);
        if (seg_merge_item(merge, (size_t)k).count > 1)
            seg_merge_build(merge, (size_t)k, (unsigned char *)PyBytes_AS_STRING(merged));
    }
    Py_END_ALLOW_THREADS
done:
    PyMem_Free(memory);
    Py_DECREF(list);
    return out;
}

PyDoc_STRVAR(cut_doc,
"cut(vnet, packet, mtu, headroom, stride, max_segments, /) -> (bytes, [(offset, length)])\n\n"
"segment.h's seg_cut, the data-plane thread's send side, for the tests: the output\n"
"buffer (max_segments * stride bytes, zeroed first) and where each segment is in it.\n"
"ValueError 'cut: malformed' for what gso.segment refuses, 'cut: no room' when the\n"
"segments do not fit.");

static PyObject *
cut(PyObject *module, PyObject *args)
{
    Py_buffer vnet, packet;
    Py_ssize_t mtu, headroom, stride, max_segments;
    if (!PyArg_ParseTuple(args, "y*y*nnnn:cut", &vnet, &packet, &mtu, &headroom, &stride,
                          &max_segments))
        return NULL;
    PyObject *out = NULL, *buffer = NULL, *places = NULL;
    seg_buf *segments = NULL;
    if (vnet.len != SEG_VNET_HDR_LEN || mtu < 0 || headroom < 0 || stride < 0
        || max_segments < 0 || max_segments > 65536 || stride > 1 << 20) {
        PyErr_SetString(PyExc_ValueError, "cut: bad arguments");
        goto done;
    }
    buffer = PyBytes_FromStringAndSize(NULL, max_segments * stride);
    segments = PyMem_Malloc((size_t)(max_segments ? max_segments : 1) * sizeof(seg_buf));
    if (buffer == NULL || segments == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    unsigned char *base = (unsigned char *)PyBytes_AS_STRING(buffer);
    memset(base, 0, (size_t)(max_segments * stride));
    ptrdiff_t count = seg_cut(vnet.buf, packet.buf, (size_t)packet.len, (size_t)mtu, base,
                              (size_t)stride, (size_t)headroom, segments, (size_t)max_segments);
    if (count < 0) {
        PyErr_SetString(PyExc_ValueError, count == SEG_EINVAL ? "cut: malformed" : "cut: no room");
        goto done;
    }
    places = PyList_New(count);
    for (ptrdiff_t i = 0; places != NULL && i < count; i++) {
        PyObject *place = Py_BuildValue("(nn)", (Py_ssize_t)(segments[i].data - base),
                                        (Py_ssize_t)segments[i].size);
        if (place == NULL)
            Py_CLEAR(places);
        else
            PyList_SET_ITEM(places, i, place);
    }
    if (places != NULL)
        out = PyTuple_Pack(2, buffer, places);
done:
    Py_XDECREF(buffer);
    Py_XDECREF(places);
    PyMem_Free(segments);
    PyBuffer_Release(&vnet);
    PyBuffer_Release(&packet);
    return out;
}

PyDoc_STRVAR(batches_doc,
"batches(datagrams, max_bytes, max_segments) -> [(buffer, segment size)]\n\n"
"gso.gso_batches in one pass: runs of datagrams as long as the first (the last may be\n"
"shorter) joined into one UDP_SEGMENT buffer, a lone datagram as itself with size 0.");

static PyObject *
batches(PyObject *module, PyObject *args)
{
    PyObject *datagrams;
    Py_ssize_t max_bytes, max_segments;
    if (!PyArg_ParseTuple(args, "Onn", &datagrams, &max_bytes, &max_segments))
        return NULL;
    PyObject *items = bytes_list(datagrams);
    if (items == NULL)
        return NULL;
    Py_ssize_t count = PyList_GET_SIZE(items);
    PyObject *out = PyList_New(0);
    for (Py_ssize_t i = 0, end; out != NULL && i < count; i = end) {
        Py_ssize_t size = PyBytes_GET_SIZE(PyList_GET_ITEM(items, i)), total = size;
        for (end = i + 1; end < count; end++) {
            Py_ssize_t length = PyBytes_GET_SIZE(PyList_GET_ITEM(items, end));
            if (length > size || end - i >= max_segments || total + length > max_bytes
                || PyBytes_GET_SIZE(PyList_GET_ITEM(items, end - 1)) != size)
                break;
            total += length;
        }
        PyObject *buffer;
        if (end - i == 1) {
            buffer = Py_NewRef(PyList_GET_ITEM(items, i));
            size = 0;
        }
        else if ((buffer = PyBytes_FromStringAndSize(NULL, total)) != NULL) {
            char *at = PyBytes_AS_STRING(buffer);
            for (Py_ssize_t k = i; k < end; k++) {
                PyObject *item = PyList_GET_ITEM(items, k);
                memcpy(at, PyBytes_AS_STRING(item), (size_t)PyBytes_GET_SIZE(item));
                at += PyBytes_GET_SIZE(item);
            }
        }
        PyObject *pair = buffer == NULL ? NULL : Py_BuildValue("(Nn)", buffer, size);
        if (pair == NULL || PyList_Append(out, pair) < 0)
            Py_CLEAR(out);
        Py_XDECREF(pair);
    }
    Py_DECREF(items);
    return out;
}

PyDoc_STRVAR(split_gro_doc,
"split_gro(data, gso_size) -> [bytes]\n\n"
"gso.split_gro in one pass: a coalesced receive cut into its datagrams (gso_size 0 or\n"
"at least the length: the whole as one).");

static PyObject *
split_gro(PyObject *module, PyObject *args)
{
    Py_buffer view;
    Py_ssize_t size;
    if (!PyArg_ParseTuple(args, "y*n", &view, &size))
        return NULL;
    Py_ssize_t length = view.len;
    if (size <= 0 || length <= size)
        size = length > 0 ? length : 1;
    PyObject *out = PyList_New((length + size - 1) / size + (length == 0));
    for (Py_ssize_t i = 0, at = 0; out != NULL && i < PyList_GET_SIZE(out); i++, at += size) {
        Py_ssize_t piece = length - at < size ? length - at : size;
        PyObject *datagram = PyBytes_FromStringAndSize((const char *)view.buf + at, piece);
        if (datagram == NULL)
            Py_CLEAR(out);
        else
            PyList_SET_ITEM(out, i, datagram);
    }
    PyBuffer_Release(&view);
    return out;
}

static PyMethodDef module_methods[] = {
    {"split_gro", (PyCFunction)split_gro, METH_VARARGS, split_gro_doc},
    {"batches", (PyCFunction)batches, METH_VARARGS, batches_doc},
    {"split", (PyCFunction)split, METH_VARARGS, split_doc},
    {"coalesce", (PyCFunction)coalesce, METH_VARARGS, coalesce_doc},
    {"cut", (PyCFunction)cut, METH_VARARGS, cut_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef segment_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "uspan.daemon._segment",
    .m_doc = "TSO/USO super-segments split and GRO-merged (uspan.daemon.gso), in C.",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC
PyInit__segment(void)
{
    vnet_none = PyBytes_FromStringAndSize(NULL, SEG_VNET_HDR_LEN);
    if (vnet_none == NULL)
        return NULL;
    memset(PyBytes_AS_STRING(vnet_none), 0, SEG_VNET_HDR_LEN);
    if (getrandom(&hash_seed, sizeof hash_seed, 0) != (ssize_t)sizeof hash_seed)
        hash_seed = 0;  /* FNV's own basis: a weaker table, the same merges */
    PyObject *module = PyModule_Create(&segment_module);
    if (module != NULL
        && PyModule_AddIntConstant(module, "UDP_MAX_SEGMENTS", SEG_UDP_MAX_SEGMENTS) < 0)
        Py_CLEAR(module);
    return module;
}
