/* The hot path of leakhunt's ledger: outstanding address ranges of a process tree, and a whole
 * batch of mmap-family calls applied to them in one call.
 *
 * A real UCX process makes tens of thousands of memory calls a second; with --all-events, or a
 * storm of partial unmaps, each reaches user space, and applying them one by one from Python
 * (a bisect, a dict update and an object or two per call) costs ~10 us each: the reader fell a
 * second behind every second. Here a batch of calls, as numpy columns, is applied in C with the
 * same semantics as leakhunt.trace.ledger's Python reference (_PyRanges, kept as the fallback and
 * checked against this one by tests/test_trace_ledger_core.py).
 *
 * Per process, ranges are kept sorted in blocks of at most BLOCK entries (a B-tree of depth two):
 * finding, cutting and inserting cost a binary search and a memmove of at most one block.
 *
 * Ranges(): one per ledger
 *   .apply(ts, pid, kind, addr, length, arg, flags, ret, site, count, mapped, unmapped,
 *          map_fixed, mremap_dontunmap) -> unmatched unmaps
 *       columns: int64 ts (ns), uint32 pid, uint8 kind (KIND_* below), uint64 addr, length, arg
 *       (mremap: new length; shmat: segment size), flags, int64 ret, int32 site; the per-site
 *       sums count/mapped/unmapped (int64, indexed by site) are added to in place.
 *   .remove(pid, lo, hi, ts)   drop the pieces of the mapping made at ts (gone from the kernel map)
 *   .drop(pid, before_ts, unmapped) -> None   the address space is gone: pieces made before
 *   .set_brk(pid, value)       the program break at the start, if not known yet
 *   .at(pid, address) -> (lo, hi, site, ts, kernel) | None
 *   .export() -> bytes         (uint64 pid, lo, hi, int64 ts, int32 site, kernel) records
 *   len(r), r.dropped          ranges held, ranges refused past max_ranges
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define BLOCK 128
#define PAGE 4096ULL

enum { KIND_MMAP = 1, KIND_MUNMAP, KIND_MREMAP, KIND_BRK, KIND_SHMAT, KIND_SHMDT, KIND_KADD };

typedef struct { uint64_t lo, hi; int64_t ts; int32_t site; int32_t kernel; } iv_t;
typedef struct { int n; iv_t v[BLOCK]; } block_t;
typedef struct {
    uint32_t pid;
    block_t **blocks;
    Py_ssize_t nblocks, cap;
    uint64_t brk;
    int has_brk;
} proc_t;

typedef struct { iv_t *v; Py_ssize_t n, cap; } ivvec;

typedef struct {
    PyObject_HEAD
    proc_t *procs;
    Py_ssize_t nprocs, cap;
    Py_ssize_t ranges, max_ranges, dropped;
    ivvec tmp;
} Ranges;

static uint64_t page_round(uint64_t n) { return (n + PAGE - 1) & ~(PAGE - 1); }

static int vec_push(ivvec *a, iv_t x) {
    if (a->n == a->cap) {
        Py_ssize_t cap = a->cap ? a->cap * 2 : 64;
        iv_t *v = PyMem_Realloc(a->v, cap * sizeof(iv_t));
        if (!v) { PyErr_NoMemory(); return -1; }
        a->v = v;
        a->cap = cap;
    }
    a->v[a->n++] = x;
    return 0;
}

static proc_t *proc_get(Ranges *r, uint32_t pid, int create) {
    for (Py_ssize_t i = 0; i < r->nprocs; i++)
        if (r->procs[i].pid == pid) return &r->procs[i];
    if (!create) return NULL;
    if (r->nprocs == r->cap) {
        Py_ssize_t cap = r->cap ? r->cap * 2 : 8;
        proc_t *p = PyMem_Realloc(r->procs, cap * sizeof(proc_t));
        if (!p) { PyErr_NoMemory(); return NULL; }
        r->procs = p;
        r->cap = cap;
    }
    proc_t *p = &r->procs[r->nprocs++];
    memset(p, 0, sizeof *p);
    p->pid = pid;
    return p;
}

/* The first block whose last range ends after lo (nblocks when none). */
static Py_ssize_t block_after(proc_t *p, uint64_t lo) {
    Py_ssize_t a = 0, b = p->nblocks;
    while (a < b) {
        Py_ssize_t m = (a + b) / 2;
        block_t *blk = p->blocks[m];
        if (blk->v[blk->n - 1].hi > lo) b = m; else a = m + 1;
    }
    return a;
}

/* The first range of a block that ends after lo. */
static int index_after(block_t *blk, uint64_t lo) {
    int a = 0, b = blk->n;
    while (a < b) {
        int m = (a + b) / 2;
        if (blk->v[m].hi > lo) b = m; else a = m + 1;
    }
    return a;
}

static int blocks_insert(proc_t *p, Py_ssize_t at, block_t *blk) {
    if (p->nblocks == p->cap) {
        Py_ssize_t cap = p->cap ? p->cap * 2 : 4;
        block_t **v = PyMem_Realloc(p->blocks, cap * sizeof(block_t *));
        if (!v) { PyErr_NoMemory(); return -1; }
        p->blocks = v;
        p->cap = cap;
    }
    memmove(&p->blocks[at + 1], &p->blocks[at], (p->nblocks - at) * sizeof(block_t *));
    p->blocks[at] = blk;
    p->nblocks++;
    return 0;
}

static void blocks_remove(proc_t *p, Py_ssize_t at) {
    PyMem_Free(p->blocks[at]);
    memmove(&p->blocks[at], &p->blocks[at + 1], (p->nblocks - at - 1) * sizeof(block_t *));
    p->nblocks--;
}

/* Insert one range that overlaps none held. */
static int insert(Ranges *r, proc_t *p, iv_t x) {
    if (x.hi <= x.lo) return 0;
    if (r->ranges >= r->max_ranges) { r->dropped++; return 0; }
    if (p->nblocks == 0) {
        block_t *blk = PyMem_Malloc(sizeof(block_t));
        if (!blk) { PyErr_NoMemory(); return -1; }
        blk->n = 0;
        if (blocks_insert(p, 0, blk) < 0) { PyMem_Free(blk); return -1; }
    }
    Py_ssize_t b = block_after(p, x.lo);
    if (b == p->nblocks) b--;
    block_t *blk = p->blocks[b];
    if (blk->n == BLOCK) {   /* split in halves */
        block_t *right = PyMem_Malloc(sizeof(block_t));
        if (!right) { PyErr_NoMemory(); return -1; }
        right->n = BLOCK / 2;
        memcpy(right->v, &blk->v[BLOCK / 2], (BLOCK / 2) * sizeof(iv_t));
        blk->n = BLOCK / 2;
        if (blocks_insert(p, b + 1, right) < 0) { PyMem_Free(right); return -1; }
        if (x.lo >= blk->v[blk->n - 1].hi) blk = right;
    }
    int i = index_after(blk, x.lo);
    memmove(&blk->v[i + 1], &blk->v[i], (blk->n - i) * sizeof(iv_t));
    blk->v[i] = x;
    blk->n++;
    r->ranges++;
    return 0;
}

/* Take every range overlapping [lo, hi) out, into out. */
static int take(Ranges *r, proc_t *p, uint64_t lo, uint64_t hi, ivvec *out) {
    Py_ssize_t b = block_after(p, lo);
    while (b < p->nblocks) {
        block_t *blk = p->blocks[b];
        int i = index_after(blk, lo), j = i;
        while (j < blk->n && blk->v[j].lo < hi) {
            if (vec_push(out, blk->v[j]) < 0) return -1;
            j++;
        }
        if (j > i) {
            memmove(&blk->v[i], &blk->v[j], (blk->n - j) * sizeof(iv_t));
            blk->n -= j - i;
            r->ranges -= j - i;
        }
        int more = blk->n == i;   /* the run may go on into the next block */
        if (blk->n == 0) blocks_remove(p, b); else b++;
        if (!more) break;
        if (b < p->nblocks && p->blocks[b]->v[0].lo >= hi) break;
    }
    return 0;
}

/* Unmap [lo, hi) at ts: pieces made later stay, the others lose what the range covers; the
 * bytes each loses go to its site's unmapped sum when count. Returns 1 when anything was
 * there, -1 on error. */
static int cut(Ranges *r, proc_t *p, uint64_t lo, uint64_t hi, int64_t ts, int64_t *unmapped, int count) {
    ivvec *t = &r->tmp;
    t->n = 0;
    if (take(r, p, lo, hi, t) < 0) return -1;
    int found = 0;
    for (Py_ssize_t k = 0; k < t->n; k++) {
        iv_t v = t->v[k];
        if (v.ts > ts) {
            if (insert(r, p, v) < 0) return -1;
            continue;
        }
        found = 1;
        uint64_t a = v.lo > lo ? v.lo : lo, b = v.hi < hi ? v.hi : hi;
        if (count && v.site >= 0) unmapped[v.site] += (int64_t)(b - a);
        if (v.lo < lo) { iv_t left = v; left.hi = lo; if (insert(r, p, left) < 0) return -1; }
        if (v.hi > hi) { iv_t right = v; right.lo = hi; if (insert(r, p, right) < 0) return -1; }
    }
    return found;
}

/* A new mapping: whatever is still held there is stale (the kernel never lets two overlap). */
static int add(Ranges *r, proc_t *p, iv_t x) {
    ivvec *t = &r->tmp;
    t->n = 0;
    if (take(r, p, x.lo, x.hi, t) < 0) return -1;
    for (Py_ssize_t k = 0; k < t->n; k++) {
        iv_t v = t->v[k];
        if (v.lo < x.lo) { iv_t left = v; left.hi = x.lo; if (insert(r, p, left) < 0) return -1; }
        if (v.hi > x.hi) { iv_t right = v; right.lo = x.hi; if (insert(r, p, right) < 0) return -1; }
    }
    return insert(r, p, x);
}

static iv_t *find(proc_t *p, uint64_t address) {
    Py_ssize_t b = block_after(p, address);
    if (b == p->nblocks) return NULL;
    block_t *blk = p->blocks[b];
    int i = index_after(blk, address);
    if (i < blk->n && blk->v[i].lo <= address) return &blk->v[i];
    return NULL;
}

/* --- the Python type ------------------------------------------------------------------------ */

static int get_buffer(PyObject *o, Py_buffer *view, Py_ssize_t itemsize, Py_ssize_t n, int writable, const char *name) {
    if (PyObject_GetBuffer(o, view, PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0)) < 0) return -1;
    if (view->len != n * itemsize && n >= 0) {
        PyErr_Format(PyExc_ValueError, "%s: %zd bytes, expected %zd", name, view->len, n * itemsize);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static PyObject *Ranges_apply(Ranges *r, PyObject *args) {
    PyObject *o[12];
    unsigned long long map_fixed, dontunmap;
    if (!PyArg_ParseTuple(args, "OOOOOOOOOOOOKK", &o[0], &o[1], &o[2], &o[3], &o[4], &o[5], &o[6], &o[7],
                          &o[8], &o[9], &o[10], &o[11], &map_fixed, &dontunmap))
        return NULL;
    Py_buffer b[12];
    int got = 0;
    Py_ssize_t n = -1;
    static const Py_ssize_t size[9] = {8, 4, 1, 8, 8, 8, 8, 8, 4};
    static const char *names[12] = {"ts", "pid", "kind", "addr", "length", "arg", "flags", "ret", "site",
                                    "count", "mapped", "unmapped"};
    PyObject *result = NULL;
    for (; got < 12; got++) {
        if (got == 0) {
            if (PyObject_GetBuffer(o[0], &b[0], PyBUF_C_CONTIGUOUS) < 0) goto done;
            n = b[0].len / 8;
            continue;
        }
        if (got < 9) {
            if (get_buffer(o[got], &b[got], size[got], n, 0, names[got]) < 0) goto done;
        } else if (get_buffer(o[got], &b[got], 8, -1, 1, names[got]) < 0) {
            goto done;
        }
    }
    {
        const int64_t *ts = b[0].buf, *ret = b[7].buf;
        const uint32_t *pid = b[1].buf;
        const uint8_t *kind = b[2].buf;
        const uint64_t *addr = b[3].buf, *length = b[4].buf, *arg = b[5].buf, *flags = b[6].buf;
        const int32_t *site = b[8].buf;
        int64_t *count = b[9].buf, *mapped = b[10].buf, *unmapped = b[11].buf;
        Py_ssize_t nsites = b[9].len / 8;
        if (b[10].len / 8 != nsites || b[11].len / 8 != nsites) {
            PyErr_SetString(PyExc_ValueError, "count, mapped and unmapped differ in length");
            goto done;
        }
        long long unmatched = 0;
        for (Py_ssize_t i = 0; i < n; i++) {
            if (site[i] >= nsites) {
                PyErr_Format(PyExc_ValueError, "site %d past the per-site sums (%zd)", site[i], nsites);
                goto done;
            }
            if (ret[i] < 0 && ret[i] > -4096) continue;   /* failed (brk never returns an error) */
            proc_t *p = proc_get(r, pid[i], 1);
            if (!p) goto done;
            int32_t s = site[i];
            int rc = 0;
            switch (kind[i]) {
            case KIND_MMAP: {
                uint64_t lo = (uint64_t)ret[i], hi = lo + page_round(length[i]);
                if (flags[i] & map_fixed) rc = cut(r, p, lo, hi, ts[i], unmapped, 1);
                if (rc >= 0) {
                    if (s >= 0) { count[s] += 1; mapped[s] += (int64_t)(hi - lo); }
                    iv_t x = {lo, hi, ts[i], s, 0};
                    rc = add(r, p, x);
                }
                break;
            }
            case KIND_KADD: {
                iv_t x = {addr[i], addr[i] + length[i], ts[i], s, 1};
                rc = add(r, p, x);
                break;
            }
            case KIND_MUNMAP:
                rc = cut(r, p, addr[i], addr[i] + page_round(length[i]), ts[i], unmapped, 1);
                if (rc == 0) unmatched++;
                break;
            case KIND_MREMAP: {
                uint64_t olo = addr[i], ohi = olo + page_round(length[i]);
                uint64_t nlen = page_round(arg[i]), olen = ohi - olo;
                iv_t *owner = find(p, olo);
                int32_t os = owner && owner->ts <= ts[i] ? owner->site : s;
                if (!(flags[i] & dontunmap)) rc = cut(r, p, olo, ohi, ts[i], unmapped, 0);
                if (rc >= 0) {   /* the moved pages stay the owner's, held in user space now */
                    iv_t x = {(uint64_t)ret[i], (uint64_t)ret[i] + nlen, ts[i], os, 0};
                    rc = add(r, p, x);
                }
                if (os >= 0 && nlen > olen) mapped[os] += (int64_t)(nlen - olen);
                else if (os >= 0 && nlen < olen) unmapped[os] += (int64_t)(olen - nlen);
                break;
            }
            case KIND_BRK: {
                uint64_t now = (uint64_t)ret[i];
                if (p->has_brk && now > p->brk) {
                    if (s >= 0) { count[s] += 1; mapped[s] += (int64_t)(now - p->brk); }
                    iv_t x = {p->brk, now, ts[i], s, 0};
                    rc = add(r, p, x);
                } else if (p->has_brk && now < p->brk) {
                    rc = cut(r, p, now, p->brk, ts[i], unmapped, 1);
                }
                p->brk = now;
                p->has_brk = 1;
                break;
            }
            case KIND_SHMAT:
                if (arg[i]) {
                    uint64_t lo = (uint64_t)ret[i], hi = lo + page_round(arg[i]);
                    if (s >= 0) { count[s] += 1; mapped[s] += (int64_t)(hi - lo); }
                    iv_t x = {lo, hi, ts[i], s, 0};
                    rc = add(r, p, x);
                }
                break;
            case KIND_SHMDT: {
                iv_t *hit = find(p, addr[i]);
                if (hit) rc = cut(r, p, hit->lo, hit->hi, ts[i], unmapped, 1);
                break;
            }
            default:
                break;
            }
            if (rc < 0) goto done;
        }
        result = PyLong_FromLongLong(unmatched);
    }
done:
    for (int k = 0; k < got; k++) PyBuffer_Release(&b[k]);
    return result;
}

static PyObject *Ranges_remove(Ranges *r, PyObject *args) {
    unsigned int pid;
    unsigned long long lo, hi;
    long long ts;
    if (!PyArg_ParseTuple(args, "IKKL", &pid, &lo, &hi, &ts)) return NULL;
    proc_t *p = proc_get(r, pid, 0);
    if (p) {
        ivvec *t = &r->tmp;
        t->n = 0;
        if (take(r, p, lo, hi, t) < 0) return NULL;
        for (Py_ssize_t k = 0; k < t->n; k++)
            if ((t->v[k].ts != ts || !t->v[k].kernel) && insert(r, p, t->v[k]) < 0) return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *Ranges_drop(Ranges *r, PyObject *args) {
    unsigned int pid;
    long long before;
    PyObject *uo;
    if (!PyArg_ParseTuple(args, "ILO", &pid, &before, &uo)) return NULL;
    Py_buffer ub;
    if (get_buffer(uo, &ub, 8, -1, 1, "unmapped") < 0) return NULL;
    int64_t *unmapped = ub.buf;
    Py_ssize_t nsites = ub.len / 8;
    proc_t *p = proc_get(r, pid, 0);
    if (p) {
        ivvec *t = &r->tmp;
        t->n = 0;
        if (take(r, p, 0, UINT64_MAX, t) < 0) { PyBuffer_Release(&ub); return NULL; }
        for (Py_ssize_t k = 0; k < t->n; k++) {
            iv_t v = t->v[k];
            if (v.ts >= before) {
                if (insert(r, p, v) < 0) { PyBuffer_Release(&ub); return NULL; }
            } else if (v.site >= 0 && v.site < nsites) {
                unmapped[v.site] += (int64_t)(v.hi - v.lo);
            }
        }
        p->has_brk = 0;
    }
    PyBuffer_Release(&ub);
    Py_RETURN_NONE;
}

static PyObject *Ranges_set_brk(Ranges *r, PyObject *args) {
    unsigned int pid;
    unsigned long long value;
    if (!PyArg_ParseTuple(args, "IK", &pid, &value)) return NULL;
    proc_t *p = proc_get(r, pid, 1);
    if (!p) return NULL;
    if (!p->has_brk) { p->brk = value; p->has_brk = 1; }
    Py_RETURN_NONE;
}

static PyObject *Ranges_at(Ranges *r, PyObject *args) {
    unsigned int pid;
    unsigned long long address;
    if (!PyArg_ParseTuple(args, "IK", &pid, &address)) return NULL;
    proc_t *p = proc_get(r, pid, 0);
    iv_t *hit = p ? find(p, address) : NULL;
    if (!hit) Py_RETURN_NONE;
    return Py_BuildValue("(KKiLi)", hit->lo, hit->hi, hit->site, (long long)hit->ts, hit->kernel);
}

typedef struct { uint64_t pid, lo, hi; int64_t ts; int32_t site, kernel; } export_t;

static PyObject *Ranges_export(Ranges *r, PyObject *unused) {
    PyObject *out = PyBytes_FromStringAndSize(NULL, r->ranges * (Py_ssize_t)sizeof(export_t));
    if (!out) return NULL;
    export_t *e = (export_t *)PyBytes_AS_STRING(out);
    for (Py_ssize_t i = 0; i < r->nprocs; i++) {
        proc_t *p = &r->procs[i];
        for (Py_ssize_t b = 0; b < p->nblocks; b++) {
            block_t *blk = p->blocks[b];
            for (int j = 0; j < blk->n; j++, e++) {
                e->pid = p->pid; e->lo = blk->v[j].lo; e->hi = blk->v[j].hi;
                e->ts = blk->v[j].ts; e->site = blk->v[j].site; e->kernel = blk->v[j].kernel;
            }
        }
    }
    return out;
}

static Py_ssize_t Ranges_len(Ranges *r) { return r->ranges; }

static int Ranges_init(Ranges *r, PyObject *args, PyObject *kwds) {
    static char *kw[] = {"max_ranges", NULL};
    Py_ssize_t max_ranges = PY_SSIZE_T_MAX;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|n", kw, &max_ranges)) return -1;
    r->max_ranges = max_ranges;
    return 0;
}

static void Ranges_dealloc(Ranges *r) {
    for (Py_ssize_t i = 0; i < r->nprocs; i++) {
        for (Py_ssize_t b = 0; b < r->procs[i].nblocks; b++) PyMem_Free(r->procs[i].blocks[b]);
        PyMem_Free(r->procs[i].blocks);
    }
    PyMem_Free(r->procs);
    PyMem_Free(r->tmp.v);
    Py_TYPE(r)->tp_free((PyObject *)r);
}

static PyObject *Ranges_dropped(Ranges *r, void *unused) { return PyLong_FromSsize_t(r->dropped); }

static PyMethodDef Ranges_methods[] = {
    {"apply", (PyCFunction)Ranges_apply, METH_VARARGS, "apply a batch of calls (see the module's header)"},
    {"remove", (PyCFunction)Ranges_remove, METH_VARARGS, "drop the kernel-held pieces of one mapping"},
    {"drop", (PyCFunction)Ranges_drop, METH_VARARGS, "a process's address space is gone"},
    {"set_brk", (PyCFunction)Ranges_set_brk, METH_VARARGS, "the program break at the start"},
    {"at", (PyCFunction)Ranges_at, METH_VARARGS, "the range holding an address"},
    {"export", (PyCFunction)Ranges_export, METH_NOARGS, "every range as packed records"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Ranges_getset[] = {
    {"dropped", (getter)Ranges_dropped, NULL, "ranges refused past max_ranges", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PySequenceMethods Ranges_seq = {.sq_length = (lenfunc)Ranges_len};

static PyTypeObject RangesType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "leakhunt.trace._ledger.Ranges",
    .tp_basicsize = sizeof(Ranges),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Ranges_init,
    .tp_dealloc = (destructor)Ranges_dealloc,
    .tp_methods = Ranges_methods,
    .tp_getset = Ranges_getset,
    .tp_as_sequence = &Ranges_seq,
    .tp_doc = "outstanding ranges of a process tree (see the module's header)",
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_ledger", NULL, -1, NULL};

PyMODINIT_FUNC PyInit__ledger(void) {
    if (PyType_Ready(&RangesType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    Py_INCREF(&RangesType);
    if (PyModule_AddObject(m, "Ranges", (PyObject *)&RangesType) < 0) return NULL;
    PyModule_AddIntConstant(m, "KIND_MMAP", KIND_MMAP);
    PyModule_AddIntConstant(m, "KIND_MUNMAP", KIND_MUNMAP);
    PyModule_AddIntConstant(m, "KIND_MREMAP", KIND_MREMAP);
    PyModule_AddIntConstant(m, "KIND_BRK", KIND_BRK);
    PyModule_AddIntConstant(m, "KIND_SHMAT", KIND_SHMAT);
    PyModule_AddIntConstant(m, "KIND_SHMDT", KIND_SHMDT);
    PyModule_AddIntConstant(m, "KIND_KADD", KIND_KADD);
    return m;
}
