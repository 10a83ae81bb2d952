/* The hot path of leakhunt's sampler: one pass over /proc/PID/smaps text.
 *
 * A big inference server has tens of thousands of mappings and smaps repeats ~25 field lines
 * for each: at 50k mappings that is 40 MB of text per sample, and a line-by-line Python parser
 * costs several times what the kernel spends producing it. This parser makes one pass, stores
 * every numeric field of every mapping in a row-major int64 table (kB fields in bytes), and
 * interns the strings (perms, device, path) that tens of thousands of mappings share.
 *
 * parse(data: bytes) -> None | (names, values, start, end, offset, inode, perms, devs, paths,
 *                                  flag_text, flag_spans, perm_ids, distinct_perms, path_ids, distinct_paths)
 *   names    tuple of str: the numeric fields, in the kernel's order
 *   values   bytes: int64[n * len(names)], row-major
 *   start, end, offset, inode: bytes: uint64[n]
 *   perms, devs, paths: list of str (interned)
 *   flag_text  bytes: every VmFlags value, one after the other (a snapshot keeps these, not the
 *              whole text, which is 34 MB at 50k mappings)
 *   flag_spans bytes: int64[2 * n], (offset, length) of each VmFlags value in flag_text, -1 if absent
 *   perm_ids, path_ids: bytes: int32[n], each mapping's index into distinct_perms, distinct_paths
 *   distinct_perms, distinct_paths: list of str, in order of first appearance
 * The ids let callers classify and group once per distinct string, with numpy, instead of once
 * per mapping in Python.
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

/* The first pass runs without the GIL (other threads import or sample meanwhile), so it uses
 * malloc and reports running out of memory by a flag, and keeps strings as spans of the text with
 * ids; the second pass, with the GIL, makes one str per distinct string and the lists. */

typedef struct { int64_t *v; Py_ssize_t len, cap; } vec;

static int vec_push(vec *a, int64_t x) {
    if (a->len == a->cap) {
        Py_ssize_t cap = a->cap ? a->cap * 2 : 4096;
        int64_t *v = realloc(a->v, cap * sizeof(int64_t));
        if (!v) return -1;
        a->v = v;
        a->cap = cap;
    }
    a->v[a->len++] = x;
    return 0;
}

/* A growable byte buffer. */
typedef struct { char *p; Py_ssize_t len, cap; } text;

static int text_append(text *a, const char *p, Py_ssize_t n) {
    if (a->len + n > a->cap) {
        Py_ssize_t cap = a->cap ? a->cap : 65536;
        while (cap < a->len + n) cap *= 2;
        char *grown = realloc(a->p, cap);
        if (!grown) return -1;
        a->p = grown;
        a->cap = cap;
    }
    memcpy(a->p + a->len, p, n);
    a->len += n;
    return 0;
}

/* Open-addressing table from byte strings (spans of the text) to ids: each distinct string's
 * index in order of first appearance. `order` holds the strings by id. */
typedef struct { uint64_t hash; span key; int32_t id; } slot;
typedef struct { slot *slots; Py_ssize_t cap, used; span *order; } interner;

static uint64_t fnv1a(const char *p, Py_ssize_t n) {
    uint64_t h = 1469598103934665603ULL;
    for (Py_ssize_t i = 0; i < n; i++) { h ^= (unsigned char)p[i]; h *= 1099511628211ULL; }
    return h;
}

static int interner_grow(interner *t) {
    Py_ssize_t cap = t->cap ? t->cap * 2 : 256;
    slot *slots = calloc(cap, sizeof(slot));
    span *order = realloc(t->order, (cap / 2) * sizeof(span));
    if (!slots || !order) { free(slots); if (order) t->order = order; return -1; }
    t->order = order;
    for (Py_ssize_t i = 0; i < t->cap; i++) {
        if (!t->slots[i].key.p) continue;
        Py_ssize_t j = t->slots[i].hash & (cap - 1);
        while (slots[j].key.p) j = (j + 1) & (cap - 1);
        slots[j] = t->slots[i];
    }
    free(t->slots);
    t->slots = slots;
    t->cap = cap;
    return 0;
}

/* The id of bytes p[0:n] (p is never NULL: it points into the text); -1 when out of memory. */
static int32_t intern(interner *t, const char *p, Py_ssize_t n) {
    if ((t->used + 1) * 2 > t->cap && interner_grow(t) < 0) return -1;
    uint64_t h = fnv1a(p, n);
    Py_ssize_t j = h & (t->cap - 1);
    while (t->slots[j].key.p) {
        slot *s = &t->slots[j];
        if (s->hash == h && s->key.n == n && memcmp(s->key.p, p, n) == 0) return s->id;
        j = (j + 1) & (t->cap - 1);
    }
    int32_t id = (int32_t)t->used++;
    t->slots[j] = (slot){h, {p, n}, id};
    t->order[id] = (span){p, n};
    return id;
}

static void interner_free(interner *t) {
    free(t->slots);
    free(t->order);
}

/* With the GIL: the distinct strings as str, and each row's str, from the row ids. */
static int strings_of(interner *t, vec *ids, PyObject **distinct, PyObject **rows) {
    *distinct = PyList_New(t->used);
    *rows = PyList_New(ids->len);
    if (!*distinct || !*rows) return -1;
    for (Py_ssize_t i = 0; i < t->used; i++) {
        PyObject *str = PyUnicode_DecodeUTF8(t->order[i].p, t->order[i].n, "surrogateescape");
        if (!str) return -1;
        PyList_SET_ITEM(*distinct, i, str);
    }
    for (Py_ssize_t i = 0; i < ids->len; i++) {
        PyObject *str = PyList_GET_ITEM(*distinct, ids->v[i]);
        Py_INCREF(str);
        PyList_SET_ITEM(*rows, i, str);
    }
    return 0;
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

/* int64 ids as int32 bytes (ids count distinct strings: far below 2**31). */
static PyObject *ids_bytes(vec *a) {
    PyObject *out = PyBytes_FromStringAndSize(NULL, a->len * (Py_ssize_t)sizeof(int32_t));
    if (!out) return NULL;
    int32_t *dst = (int32_t *)PyBytes_AS_STRING(out);
    for (Py_ssize_t i = 0; i < a->len; i++) dst[i] = (int32_t)a->v[i];
    return out;
}

enum { OK, IRREGULAR, BAD, NOMEM };

typedef struct {
    span names[MAX_FIELDS];
    int is_kb[MAX_FIELDS];
    int nfields, vmflags_pos;
    Py_ssize_t n;
    vec values, hdr[4], vmflags, ids[3];   /* ids: perms, devs, paths */
    text flags;
    interner strings[3];
} parsed;

static void parsed_free(parsed *r) {
    free(r->values.v);
    free(r->vmflags.v);
    free(r->flags.p);
    for (int i = 0; i < 4; i++) free(r->hdr[i].v);
    for (int i = 0; i < 3; i++) { free(r->ids[i].v); interner_free(&r->strings[i]); }
}

/* The first pass: no Python objects, no GIL. */
static int scan(const char *data, const char *end, parsed *r) {
    int field = 0;
    r->nfields = r->vmflags_pos = -1;
    for (const char *line = data; line < end;) {
        const char *nl = memchr(line, '\n', end - line);
        const char *eol = nl ? nl : end;
        const char *next = nl ? nl + 1 : end;
        if (eol == line) { line = next; continue; }
        unsigned char c = (unsigned char)*line;
        int learning = r->nfields < 0 && r->n == 1;   /* still learning the first entry's fields */
        if (c >= 'A' && c <= 'Z') {                  /* a field line: "Name:   value [kB]" */
            if (r->n == 0) return BAD;
            const char *colon = memchr(line, ':', eol - line);
            if (!colon) return BAD;
            span name = {line, colon - line};
            const char *v = skip_spaces(colon + 1, eol);
            if (learning) {
                if (field >= MAX_FIELDS) return IRREGULAR;
                r->names[field] = name;
            } else if (field >= r->nfields || r->names[field].n != name.n ||
                       memcmp(r->names[field].p, name.p, name.n)) {
                return IRREGULAR;
            }
            if (name.n == 7 && !memcmp(name.p, "VmFlags", 7)) {
                if (learning) { r->vmflags_pos = field; r->is_kb[field] = -1; }
                else if (field != r->vmflags_pos) return IRREGULAR;
                if (vec_push(&r->vmflags, r->flags.len) < 0 || vec_push(&r->vmflags, eol - v) < 0 ||
                    text_append(&r->flags, v, eol - v) < 0)
                    return NOMEM;
            } else {
                int64_t x = 0;
                const char *d = v;
                for (; d < eol && (unsigned)(*d - '0') < 10; d++) x = x * 10 + (*d - '0');
                if (d == v) return IRREGULAR;        /* a text field we do not know */
                if (d - v > 15) return IRREGULAR;    /* past what a kernel prints: the line parser says so */
                const char *rest = skip_spaces(d, eol);
                int kb = (eol - rest == 2 && rest[0] == 'k' && rest[1] == 'B');
                if (!kb && rest != eol) return IRREGULAR;
                if (learning) r->is_kb[field] = kb;
                else if (r->is_kb[field] != kb) return IRREGULAR;
                if (vec_push(&r->values, kb ? x * 1024 : x) < 0) return NOMEM;
            }
            field++;
        } else {                                      /* a mapping line */
            if (r->n == 1 && r->nfields < 0) r->nfields = field;
            if (r->n > 0 && field != r->nfields) return IRREGULAR;
            if (r->n > 0 && r->vmflags_pos < 0 && (vec_push(&r->vmflags, -1) < 0 || vec_push(&r->vmflags, 0) < 0))
                return NOMEM;
            uint64_t nums[4];
            span str[3];                              /* perms, dev, path */
            if (!parse_header(line, eol, nums, &str[0], &str[1], &str[2])) return BAD;
            for (int i = 0; i < 4; i++)
                if (vec_push(&r->hdr[i], (int64_t)nums[i]) < 0) return NOMEM;
            for (int i = 0; i < 3; i++) {
                int32_t id = intern(&r->strings[i], str[i].p, str[i].n);
                if (id < 0 || vec_push(&r->ids[i], id) < 0) return NOMEM;
            }
            r->n++;
            field = 0;
        }
        line = next;
    }
    if (r->n == 0) return IRREGULAR;
    if (r->nfields < 0) r->nfields = field;           /* a single entry */
    if (field != r->nfields) return IRREGULAR;
    if (r->vmflags_pos < 0 && (vec_push(&r->vmflags, -1) < 0 || vec_push(&r->vmflags, 0) < 0)) return NOMEM;
    return OK;
}

static PyObject *parse(PyObject *self, PyObject *arg) {
    Py_buffer buf;
    if (PyObject_GetBuffer(arg, &buf, PyBUF_SIMPLE) < 0) return NULL;
    const char *data = buf.buf, *end = data + buf.len;
    parsed r;
    memset(&r, 0, sizeof r);
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = scan(data, end, &r);
    Py_END_ALLOW_THREADS

    PyObject *result = NULL, *name_tuple = NULL, *lists[6] = {NULL};  /* distinct, rows: perms, devs, paths */
    if (status == BAD) {
        PyErr_SetString(PyExc_ValueError, "not smaps");
        goto done;
    }
    if (status == NOMEM) {
        PyErr_NoMemory();
        goto done;
    }
    if (status == IRREGULAR) {
        Py_INCREF(Py_None);
        result = Py_None;
        goto done;
    }
    for (int i = 0; i < 3; i++)
        if (strings_of(&r.strings[i], &r.ids[i], &lists[2 * i], &lists[2 * i + 1]) < 0) goto done;
    name_tuple = PyTuple_New(r.nfields - (r.vmflags_pos >= 0));
    if (!name_tuple) goto done;
    for (int i = 0, j = 0; i < r.nfields; i++) {
        if (i == r.vmflags_pos) continue;
        PyObject *s = PyUnicode_DecodeASCII(r.names[i].p, r.names[i].n, "replace");
        if (!s) goto done;
        PyTuple_SET_ITEM(name_tuple, j++, s);
    }
    result = Py_BuildValue("(ONNNNNOOONNNONO)", name_tuple, vec_bytes(&r.values), vec_bytes(&r.hdr[0]),
                           vec_bytes(&r.hdr[1]), vec_bytes(&r.hdr[2]), vec_bytes(&r.hdr[3]), lists[1], lists[3],
                           lists[5], PyBytes_FromStringAndSize(r.flags.p ? r.flags.p : "", r.flags.len),
                           vec_bytes(&r.vmflags), ids_bytes(&r.ids[0]), lists[0], ids_bytes(&r.ids[2]), lists[4]);
done:
    parsed_free(&r);
    Py_XDECREF(name_tuple);
    for (int i = 0; i < 6; i++) Py_XDECREF(lists[i]);
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
    /* Read straight into the bytes object, grown (realloc: mremap, no copy at these sizes) with
     * the GIL held a few times: building it from a separate buffer at the end copied 35 MB. */
    Py_ssize_t cap = 1 << 20, len = 0;
    PyObject *out = PyBytes_FromStringAndSize(NULL, cap);
    if (!out) return NULL;
    int err = 0, eof = 0;
    while (!eof && !err) {
        if (cap - len < 65536) {
            if (_PyBytes_Resize(&out, cap * 2) < 0) return NULL;
            cap *= 2;
        }
        char *buf = PyBytes_AS_STRING(out);
        Py_BEGIN_ALLOW_THREADS
        while (cap - len >= 65536) {
            ssize_t n = read((int)fd, buf + len, (size_t)(cap - len));
            if (n < 0) {
                if (errno == EINTR) continue;
                err = errno;
                break;
            }
            if (n == 0) { eof = 1; break; }
            len += n;
        }
        Py_END_ALLOW_THREADS
    }
    if (err) {
        Py_DECREF(out);
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    if (_PyBytes_Resize(&out, len) < 0) return NULL;
    return out;
}

static PyMethodDef methods[] = {
    {"parse", parse, METH_O, "Parse smaps text in one pass (see the module source for the result)."},
    {"read_fd", read_fd, METH_O, "Read a file descriptor to its end without the GIL (bytes)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_smaps", "Fast smaps parser.", -1, methods};

PyMODINIT_FUNC PyInit__smaps(void) { return PyModule_Create(&module); }
