/* The hot loop of a big UAPI set request (uspan.wg.prefix.scan), in C.
 *
 * Why: a request of a million ``allowed_ip=A.B.C.D/L`` lines cost ~0.1 us per line to
 * decode and split into str lines and ~0.3 us to parse them in Python; here a line is
 * one pass over its bytes and one int.
 *
 * scan(data, pos, limit, key) reads the lines of data from pos that are key, then an
 * IPv4 prefix as strict as uspan.wg.prefix.parse (four decimal octets of at most 255
 * without leading zeros, a length from 0 to 32 without leading zeros), then a newline,
 * at most limit of them, and stops at the first line that is not. It returns the
 * prefixes (uspan.wg.prefix ints: the network bits, the tag length << 1 above bit 32)
 * and the position after the last line read.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* A decimal number at *p of at most max without leading zeros, then the byte stop;
 * -1 if there is none. *p moves past the stop byte. */
static inline long
number(const unsigned char **p, const unsigned char *end, long max, unsigned char stop)
{
    const unsigned char *q = *p;
    long value;
    if (q >= end || *q < '0' || *q > '9')
        return -1;
    value = *q++ - '0';
    if (value != 0) {
        while (q < end && *q >= '0' && *q <= '9' && value <= max)
            value = value * 10 + (*q++ - '0');
    }
    if (value > max || q >= end || *q != stop)
        return -1;
    *p = q + 1;
    return value;
}

static PyObject *
scan(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer data, key;
    Py_ssize_t pos, limit, count = 0;
    PyObject *out = NULL;
    (void)module;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "scan(data, pos, limit, key)");
        return NULL;
    }
    pos = PyLong_AsSsize_t(args[1]);
    limit = PyLong_AsSsize_t(args[2]);
    if ((pos == -1 || limit == -1) && PyErr_Occurred())
        return NULL;
    if (PyObject_GetBuffer(args[0], &data, PyBUF_SIMPLE) < 0)
        return NULL;
    if (PyObject_GetBuffer(args[3], &key, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&data);
        return NULL;
    }
    if (pos < 0 || pos > data.len) {
        PyErr_SetString(PyExc_ValueError, "pos outside data");
        goto done;
    }
    out = PyList_New(0);
    if (out == NULL)
        goto done;
    const unsigned char *base = data.buf, *end = base + data.len;
    const unsigned char *line = base + pos;
    while (count < limit && end - line > key.len
           && memcmp(line, key.buf, (size_t)key.len) == 0) {
        const unsigned char *p = line + key.len;
        uint64_t address = 0;
        long part = 0, length;
        for (int i = 0; i < 4 && part >= 0; i++) {
            part = number(&p, end, 255, i < 3 ? '.' : '/');
            address = address << 8 | (uint64_t)part;
        }
        if (part < 0 || (length = number(&p, end, 32, '\n')) < 0)
            break;
        PyObject *prefix = PyLong_FromUnsignedLongLong(
            address >> (32 - length) | (uint64_t)length << 33);
        if (prefix == NULL || PyList_Append(out, prefix) < 0) {
            Py_XDECREF(prefix);
            Py_CLEAR(out);
            goto done;
        }
        Py_DECREF(prefix);
        line = p;
        count++;
    }
    PyObject *result = Py_BuildValue("(Nn)", out, (Py_ssize_t)(line - base));
    out = result;
done:
    PyBuffer_Release(&key);
    PyBuffer_Release(&data);
    return out;
}

static PyMethodDef methods[] = {
    {"scan", (PyCFunction)(void (*)(void))scan, METH_FASTCALL,
     "scan(data, pos, limit, key): the IPv4 prefixes of the key lines from pos, and the "
     "position after them."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_prefix", "UAPI allowed_ip lines parsed in C.", -1, methods,
};

PyMODINIT_FUNC
PyInit__prefix(void)
{
    return PyModule_Create(&module);
}
