/* The hot path of leakhunt's sampler: one pass over /proc/PID/smaps text.
 *
 * A big inference server has tens of thousands of mappings and smaps repeats ~25 field lines
 * for each: at 50k mappings that is 40 MB of text per sample, and a line-by-line Python parser
 * costs several times what the kernel spends producing it. This parser makes one pass, stores
 * every numeric field of every mapping in a row-major int64 table (kB fields in bytes), and
 * interns the strings (perms, device, path) that tens of thousands of mappings share.
 *
 * parse(data: bytes) -> None | (names, values, start, end, offset, inode, perms, devs, paths, vmflags)
 *   names    tuple of str: the numeric fields, in the kernel's order
 *   values   bytes: int64[n * len(names)], row-major
 *   start, end, offset, inode: bytes: uint64[n]
 *   perms, devs, paths: list of str (interned)
 *   vmflags  bytes: int64[2 * n], (offset, length) of each VmFlags value in data, -1 if absent
 * None means "not the regular shape this parser expects" (entries with differing fields, a
 * text field other than VmFlags): leakhunt.proc.smaps then uses its line-by-line parser. Text
 * that is not smaps at all raises ValueError.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MAX_FIELDS 64

typedef struct { const char *p; Py_ssize_t n; } span;

typedef struct { int64_t *v; Py_ssize_t len, cap; } vec;

static int vec_push(vec *a, int64_t x) {
    if (a->len == a->cap) {
        Py_ssize_t cap = a->cap ? a->cap * 2 : 4096;
        int64_t *v = PyMem_Realloc(a->v, cap * sizeof(int64_t));
        if (!v) { PyErr_NoMemory(); return -1; }
        a->v = v;
        a->cap = cap;
    }
    a->v[a->len++] = x;
    return 0;
}

/* Open-addressing table from byte strings to interned Python str objects. */
typedef struct { uint64_t hash; span key; PyObject *value; } slot;
typedef struct { slot *slots; Py_ssize_t cap, used; } interner;

static uint64_t fnv1a(const char *p, Py_ssize_t n) {
    uint64_t h = 1469598103934665603ULL;
    for (Py_ssize_t i = 0; i < n; i++) { h ^= (unsigned char)p[i]; h *= 1099511628211ULL; }
    return h;
}

static int interner_grow(interner *t) {
    Py_ssize_t cap = t->cap ? t->cap * 2 : 256;
    slot *slots = PyMem_Calloc(cap, sizeof(slot));
    if (!slots) { PyErr_NoMemory(); return -1; }
    for (Py_ssize_t i = 0; i < t->cap; i++) {
        if (!t->slots[i].value) continue;
        Py_ssize_t j = t->slots[i].hash & (cap - 1);
        while (slots[j].value) j = (j + 1) & (cap - 1);
        slots[j] = t->slots[i];
    }
    PyMem_Free(t->slots);
    t->slots = slots;
    t->cap = cap;
    return 0;
}

/* A new reference to the str for bytes p[0:n]. */
static PyObject *intern(interner *t, const char *p, Py_ssize_t n) {
    if ((t->used + 1) * 2 > t->cap && interner_grow(t) < 0) return NULL;
    uint64_t h = fnv1a(p, n);
    Py_ssize_t j = h & (t->cap - 1);
    while (t->slots[j].value) {
        slot *s = &t->slots[j];
        if (s->hash == h && s->key.n == n && memcmp(s->key.p, p, n) == 0) {
            Py_INCREF(s->value);
            return s->value;
        }
        j = (j + 1) & (t->cap - 1);
    }
    PyObject *str = PyUnicode_DecodeUTF8(p, n, "surrogateescape");
    if (!str) return NULL;
    t->slots[j] = (slot){h, {p, n}, str};
    t->used++;
    Py_INCREF(str);
    return str;
}

static void interner_free(interner *t) {
    for (Py_ssize_t i = 0; i < t->cap; i++) Py_XDECREF(t->slots[i].value);
    PyMem_Free(t->slots);
}

static int parse_hex(const char **pp, const char *end, uint64_t *out) {
    const char *p = *pp;
    uint64_t v = 0;
    int digits = 0;
    for (; p < end; p++, digits++) {
        unsigned c = (unsigned char)*p, d;
        if (c - '0' < 10) d = c - '0';
        else if (c - 'a' < 6) d = c - 'a' + 10;
        else if (c - 'A' < 6) d = c - 'A' + 10;
        else break;
        v = v << 4 | d;
    }
    *pp = p;
    *out = v;
    return digits > 0 && digits <= 16;
}

static const char *skip_spaces(const char *p, const char *end) {
    while (p < end && (*p == ' ' || *p == '\t')) p++;
    return p;
}

static const char *token_end(const char *p, const char *end) {
    while (p < end && *p != ' ' && *p != '\t') p++;
    return p;
}

/* "start-end perms offset dev inode   path" */
static int parse_header(const char *p, const char *end, uint64_t *nums, span *perms, span *dev, span *path) {
    if (!parse_hex(&p, end, &nums[0]) || p >= end || *p++ != '-') return 0;
    if (!parse_hex(&p, end, &nums[1]) || p >= end || *p != ' ') return 0;
    p = skip_spaces(p, end);
    const char *q = token_end(p, end);
    if (q - p != 4) return 0;
    *perms = (span){p, q - p};
    p = skip_spaces(q, end);
    if (!parse_hex(&p, end, &nums[2]) || p >= end || *p != ' ') return 0;
    p = skip_spaces(p, end);
    q = token_end(p, end);
    if (q == p || !memchr(p, ':', q - p)) return 0;
    *dev = (span){p, q - p};
    p = skip_spaces(q, end);
    uint64_t inode = 0;
    const char *digits = p;
    for (; p < end && (unsigned)(*p - '0') < 10; p++) inode = inode * 10 + (uint64_t)(*p - '0');
    if (p == digits || (p < end && *p != ' ')) return 0;
    nums[3] = inode;
    p = skip_spaces(p, end);
    *path = (span){p, end - p};
    return 1;
}

static PyObject *vec_bytes(vec *a) {
    return PyBytes_FromStringAndSize((const char *)a->v, a->len * (Py_ssize_t)sizeof(int64_t));
}

static PyObject *parse(PyObject *self, PyObject *arg) {
    Py_buffer buf;
    if (PyObject_GetBuffer(arg, &buf, PyBUF_SIMPLE) < 0) return NULL;
    const char *data = buf.buf, *end = data + buf.len;

    span names[MAX_FIELDS];
    int is_kb[MAX_FIELDS];
    int nfields = -1, vmflags_pos = -1;     /* learnt from the first entry */
    int field = 0, irregular = 0, bad = 0;
    Py_ssize_t n = 0;
    vec values = {0}, hdr[4] = {{0}}, vmflags = {0};
    interner strings = {0};
    PyObject *perms = PyList_New(0), *devs = PyList_New(0), *paths = PyList_New(0), *result = NULL;
    if (!perms || !devs || !paths) goto done;

    for (const char *line = data; line < end && !irregular && !bad;) {
        const char *nl = memchr(line, '\n', end - line);
        const char *eol = nl ? nl : end;
        const char *next = nl ? nl + 1 : end;
        if (eol == line) { line = next; continue; }
        unsigned char c = (unsigned char)*line;
        if (c >= 'A' && c <= 'Z') {                  /* a field line: "Name:   value [kB]" */
            if (n == 0) { bad = 1; break; }
            const char *colon = memchr(line, ':', eol - line);
            if (!colon) { bad = 1; break; }
            span name = {line, colon - line};
            const char *v = skip_spaces(colon + 1, eol);
            if (nfields < 0 && n == 1) {             /* still learning the first entry's fields */
                if (field >= MAX_FIELDS) { irregular = 1; break; }
                names[field] = name;
            } else if (field >= nfields || names[field].n != name.n || memcmp(names[field].p, name.p, name.n)) {
                irregular = 1;
                break;
            }
            if (name.n == 7 && !memcmp(name.p, "VmFlags", 7)) {
                if (nfields < 0 && n == 1) { vmflags_pos = field; is_kb[field] = -1; }
                else if (field != vmflags_pos) { irregular = 1; break; }
                if (vec_push(&vmflags, v - data) < 0 || vec_push(&vmflags, eol - v) < 0) goto done;
            } else {
                int64_t x = 0;
                const char *d = v;
                for (; d < eol && (unsigned)(*d - '0') < 10; d++) x = x * 10 + (*d - '0');
                if (d == v) { irregular = 1; break; }  /* a text field we do not know */
                if (d - v > 15) { irregular = 1; break; }  /* past what a kernel prints: the line parser says so */
                const char *rest = skip_spaces(d, eol);
                int kb = (eol - rest == 2 && rest[0] == 'k' && rest[1] == 'B');
                if (!kb && rest != eol) { irregular = 1; break; }
                if (nfields < 0 && n == 1) is_kb[field] = kb;
                else if (is_kb[field] != kb) { irregular = 1; break; }
                if (vec_push(&values, kb ? x * 1024 : x) < 0) goto done;
            }
            field++;
        } else {                                      /* a mapping line */
            if (n == 1 && nfields < 0) nfields = field;
            if (n > 0 && field != nfields) { irregular = 1; break; }
            if (n > 0 && vmflags_pos < 0 && vec_push(&vmflags, -1) < 0) goto done;
            if (n > 0 && vmflags_pos < 0 && vec_push(&vmflags, 0) < 0) goto done;
            uint64_t nums[4];
            span sp, sd, spath;
            if (!parse_header(line, eol, nums, &sp, &sd, &spath)) { bad = 1; break; }
            for (int i = 0; i < 4; i++)
                if (vec_push(&hdr[i], (int64_t)nums[i]) < 0) goto done;
            PyObject *o;
            if (!(o = intern(&strings, sp.p, sp.n)) || PyList_Append(perms, o) < 0) { Py_XDECREF(o); goto done; }
            Py_DECREF(o);
            if (!(o = intern(&strings, sd.p, sd.n)) || PyList_Append(devs, o) < 0) { Py_XDECREF(o); goto done; }
            Py_DECREF(o);
            if (!(o = intern(&strings, spath.p, spath.n)) || PyList_Append(paths, o) < 0) { Py_XDECREF(o); goto done; }
            Py_DECREF(o);
            n++;
            field = 0;
        }
        line = next;
    }
    if (bad) {
        PyErr_SetString(PyExc_ValueError, "not smaps");
        goto done;
    }
    if (irregular || n == 0) {
        Py_INCREF(Py_None);
        result = Py_None;
        goto done;
    }
    if (nfields < 0) nfields = field;                 /* a single entry */
    if (field != nfields) { Py_INCREF(Py_None); result = Py_None; goto done; }
    if (vmflags_pos < 0 && (vec_push(&vmflags, -1) < 0 || vec_push(&vmflags, 0) < 0)) goto done;

    PyObject *name_tuple = PyTuple_New(nfields - (vmflags_pos >= 0));
    if (!name_tuple) goto done;
    for (int i = 0, j = 0; i < nfields; i++) {
        if (i == vmflags_pos) continue;
        PyObject *s = PyUnicode_DecodeASCII(names[i].p, names[i].n, "replace");
        if (!s) { Py_DECREF(name_tuple); goto done; }
        PyTuple_SET_ITEM(name_tuple, j++, s);
    }
    result = Py_BuildValue("(NNNNNNOOON)", name_tuple, vec_bytes(&values), vec_bytes(&hdr[0]), vec_bytes(&hdr[1]),
                           vec_bytes(&hdr[2]), vec_bytes(&hdr[3]), perms, devs, paths, vec_bytes(&vmflags));
done:
    PyMem_Free(values.v);
    PyMem_Free(vmflags.v);
    for (int i = 0; i < 4; i++) PyMem_Free(hdr[i].v);
    interner_free(&strings);
    Py_XDECREF(perms);
    Py_XDECREF(devs);
    Py_XDECREF(paths);
    PyBuffer_Release(&buf);
    return result;
}

/* read_fd(fd) -> bytes: all that is left to read from fd, read without the GIL.
 *
 * /proc's seq_files hand out a few KB per read(2): a 35 MB smaps takes ten thousand calls. From
 * Python each call takes the GIL back, so a thread reading ahead while the main thread imports
 * (leakhunt.prefetch) waited for the GIL ten thousand times. Errors raise OSError by errno
 * (ProcessLookupError, PermissionError), as os.read does. */
static PyObject *read_fd(PyObject *self, PyObject *arg) {
    long fd = PyLong_AsLong(arg);
    if (fd == -1 && PyErr_Occurred()) return NULL;
    size_t cap = 1 << 20, len = 0;
    char *buf = malloc(cap);
    if (!buf) return PyErr_NoMemory();
    int err = 0;
    Py_BEGIN_ALLOW_THREADS
    for (;;) {
        if (cap - len < 65536) {
            char *grown = realloc(buf, cap * 2);
            if (!grown) { err = ENOMEM; break; }
            buf = grown;
            cap *= 2;
        }
        ssize_t n = read((int)fd, buf + len, cap - len);
        if (n < 0) {
            if (errno == EINTR) continue;
            err = errno;
            break;
        }
        if (n == 0) break;
        len += (size_t)n;
    }
    Py_END_ALLOW_THREADS
    if (err) {
        free(buf);
        if (err == ENOMEM) return PyErr_NoMemory();
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    PyObject *out = PyBytes_FromStringAndSize(buf, (Py_ssize_t)len);
    free(buf);
    return out;
}

static PyMethodDef methods[] = {
    {"parse", parse, METH_O, "Parse smaps text in one pass (see the module source for the result)."},
    {"read_fd", read_fd, METH_O, "Read a file descriptor to its end without the GIL (bytes)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_smaps", "Fast smaps parser.", -1, methods};

PyMODINIT_FUNC PyInit__smaps(void) { return PyModule_Create(&module); }
