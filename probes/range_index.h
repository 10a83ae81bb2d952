/*
 * range_index.h - which pages of a traced process lie in a mapping the ledger tracks, for BCC.
 *
 * Pasted into mmap_ledger.c by leakhunt.trace.bcc.program_text() (BCC rewrites map calls only in
 * the text it is given). It lets the kernel decide an unmap (munmap, the old range of an mremap,
 * the range a MAP_FIXED mmap replaces) that touches no tracked mapping: counted, never streamed.
 * libucm's munmap hook makes tens of thousands of no-op munmaps a second in a real UCX process;
 * streamed, they buried the reader.
 *
 * Radix trees of 512-way nodes per process (and per generation: exec and exit start a new one).
 * A level-0 node covers 2 MiB, level 1 1 GiB, level 2 (a root) 512 GiB; a range across roots is
 * walked root by root. Every node has two bitmaps over its 512 children:
 *   full  the child is wholly tracked (at level 0 a child is a page);
 *   any   the child's own node may hold bits (levels 1-3).
 * A range is visited top-down along its two edges only: at each level at most two nodes (the one
 * holding the range's first byte and the one holding its last) are partly covered; the children
 * between are wholly covered and handled by their parent's bits. So a query, a set or a clear
 * visits at most 6 nodes a root whatever the range's size. The walk's state lives in the per-CPU
 * `state` of mmap_ledger.c, whose programs run a query inline and a clear or a set each in a
 * program of its own (the verifier's budget).
 *
 * The one rule that keeps decisions correct: a page's bit may be set when nothing tracked is
 * there (then an unmap is streamed for nothing, and user space finds it a no-op), but never
 * clear while a tracked mapping covers it (then an unmap that cut a tracked mapping would go
 * unseen). So:
 *   - a node is created once (insert, never overwrite) and never deleted while its generation
 *     lives; bits change by atomic or/and only;
 *   - setting writes a child's bits before its parent's `any` bit, and checks that bit again
 *     after the child's bits even when it found it set;
 *   - `any` bits stay when a child empties (a query then looks one level deeper, and finds
 *     nothing), except where a clear wholly covers children: it empties the node of the first
 *     of them that has one, per visited node (a zap), and takes its parent's bit away, re-checking
 *     the child afterwards; the rest keep their bits (over-set, which is safe);
 *   - when a node cannot be created (IDX_MAX reached), `degraded` is set and every unmap that is
 *     not an exact kernel-ledger hit is streamed, as before this index existed.
 * The common case skips the walk. A set or clear within one 2 MiB block touches only that block's
 * level-0 node (one lookup, not three, and no re-checks): a clear when the node holds some of the
 * range's bits; a set when a walk `linked` the node (found every `any` bit from the root to it)
 * and no zap, the one thing that takes `any` bits away, has begun since. Zaps are counted, odd
 * while one runs, in `zaps`. Where that fails, the walk runs and links the node again. Balanced
 * mmap/munmap pairs (a malloc's arenas, libucm's hook) thus cost one lookup each. A query within
 * one block whose ancestors this CPU found without a `full` bit over it, with no big set (one
 * that covers a whole block: the only writer of such bits) begun since, asks the block's node
 * alone (idx_query_block): libucm's unmaps of holes beside live mappings cost one lookup too.
 * The handlers run after the syscalls, outside mmap_lock: an munmap whose handler runs after the
 * handler of a later mmap of the same pages (another thread) clears that mapping's bits. The
 * kernel ledger's exact-match map shares this race; it needs two threads to reuse the same pages
 * within microseconds.
 */

struct idx_key_t { u32 pid; u32 gen; u64 node; };   /* node: level << 56 | index at that level */
/* linked (level 0 only): the zap count + 1 at which a walk last found the node's ancestors'
 * `any` bits leading to it (idx_set_fast), 0 when none did. */
struct idx_node_t { u64 full[8]; u64 any[8]; u64 linked; };
/* One walk over [a, b): the level it is at, which edge nodes it reaches there, and the child bits
 * whose parent's `any` bit a set owes once the level below is done (by level and side; the parent
 * nodes themselves are pointers the walk keeps on its stack). */
struct idx_walk_t {
    u64 a, b;
    u32 gen; s32 level; u32 reach_l, reach_r;
    s32 pend_bit[8];
    /* by level (1-2) and side: a node whose wholly covered children to empty, their bits */
    u64 zap_node[8];
    s32 zap_f0[8], zap_f1[8];  /* zap_f0 < 0: nothing to empty; 4 to 7 unused */
};

BPF_F_TABLE("hash", struct idx_key_t, struct idx_node_t, ranges, IDX_MAX, BPF_F_NO_PREALLOC);
BPF_HASH(gens, u32, u32, 4096);
BPF_ARRAY(degraded, u32, 1);
BPF_ARRAY(zero_node, struct idx_node_t, 1);   /* never written: what a new node starts as */
/* Zaps begun and ended, all processes: odd while one runs. The one thing that takes `any` bits
 * away, so the one thing that can unlink a level-0 node from its root. */
BPF_ARRAY(zaps, u64, 1);
/* Big sets begun and ended, all processes: odd while one runs. A big set covers a whole 2 MiB
 * block, and is the one thing that sets `full` bits above level 0 (a clear that cuts a wholly
 * tracked child only moves such bits down). See idx_query_block. */
BPF_ARRAY(bigsets, u64, 1);
/* Per CPU, direct-mapped: blocks a query found no `full` bit above, and the big-set count it
 * saw then (even). While the count stays, the block's pages are tracked only if its level-0
 * node says so. */
struct idx_block_t { u32 pid; u32 gen; u64 block; u64 bigsets; };
BPF_PERCPU_ARRAY(clear_above, struct idx_block_t, IDX_BLOCKS);

static __always_inline u64 *idx_zaps(void) {
    int zero = 0;
    return zaps.lookup(&zero);
}

static __always_inline int idx_degraded(void) {
    int zero = 0;
    u32 *d = degraded.lookup(&zero);
    return d && *d;
}

static __always_inline void idx_degrade(void) {
    int zero = 0;
    u32 *d = degraded.lookup(&zero);
    if (d)
        *d = 1;
}

/* Start a walk over [a, b), in the process's generation gen (its value in `gens`, 0 when none),
 * from its first root; returns where that root ends, or b: the rest of the range, if any, is
 * walked next from there. A set or a clear (marks) starts with nothing owed; a query owes
 * nothing and skips those stores (an unmap of a hole is a query alone). */
static __always_inline u64 idx_begin(struct idx_walk_t *w, u32 gen, u64 a, u64 b, int marks) {
    u64 end = ((a >> IDX_ROOT_SHIFT) + 1) << IDX_ROOT_SHIFT;
    w->a = a;
    w->b = b < end ? b : end;
    w->gen = gen;
    w->level = IDX_ROOT;
    w->reach_l = 1;
    w->reach_r = 1;
    if (!marks)
        return w->b;
    #pragma unroll
    for (int i = 0; i < 8; i++)
        w->pend_bit[i] = -1;
    #pragma unroll
    for (int i = 0; i < 8; i++)
        w->zap_f0[i] = -1;
    return w->b;
}

/* Bits j0..j1 (inclusive, 0..511) that fall in word w. */
static __always_inline u64 idx_mask(s32 j0, s32 j1, int w) {
    s32 lo = w * 64, hi = lo + 63;
    if (j1 < lo || j0 > hi || j0 > j1)
        return 0;
    u32 s = (u32)((j0 > lo ? j0 : lo) - lo) & 63;
    u32 e = (u32)((j1 < hi ? j1 : hi) - lo) & 63;
    return (~0ULL >> ((63 - (e - s)) & 63)) << s;
}

static __always_inline u64 idx_bit(u32 j) { return 1ULL << (j & 63); }

static __always_inline int idx_test(u64 *bits, u32 j) {
    j &= 511;
    return (bits[j >> 6] >> (j & 63)) & 1;
}

static __always_inline int idx_empty(struct idx_node_t *n) {
    u64 acc = 0;
    #pragma unroll
    for (int w = 0; w < 8; w++)
        acc |= n->full[w] | n->any[w];
    return acc == 0;
}

/* A locked instruction only when the bits change: most of a walk finds them as wanted. */
static __always_inline void idx_or(u64 *word, u64 m) {
    if ((*word & m) != m)
        __sync_fetch_and_or(word, m);
}

static __always_inline void idx_andnot(u64 *word, u64 m) {
    if (*word & m)
        __sync_fetch_and_and(word, ~m);
}

static __always_inline struct idx_node_t *idx_node(u32 pid, u32 gen, s32 level, u64 index, int create) {
    struct idx_key_t k = {.pid = pid, .gen = gen, .node = ((u64)(level & 3) << 56) | index};
    struct idx_node_t *n = ranges.lookup(&k);
    if (n || !create)
        return n;
    int z = 0;
    struct idx_node_t *zero = zero_node.lookup(&z);
    if (zero)
        ranges.insert(&k, zero);       /* fails harmlessly when another CPU created it first */
    n = ranges.lookup(&k);
    if (!n)
        idx_degrade();
    return n;
}

/* Where the walk's range meets node `index` of its level: the children it covers wholly (bits
 * f0..f1) and the partly covered ones, jl (holding a) and jr (holding b - 1), -1 when none. */
struct idx_span_t { s32 f0; s32 f1; s32 jl; s32 jr; };

static __always_inline struct idx_span_t idx_span(struct idx_walk_t *w, u64 index) {
    u32 cs = (12 + 9 * (u32)w->level) & 63;          /* log2 of a child's size */
    u64 nlo = index << ((cs + 9) & 63), nhi = nlo + (1ULL << ((cs + 9) & 63));
    u64 x = w->a > nlo ? w->a : nlo, y = w->b < nhi ? w->b : nhi;
    u64 cmask = (1ULL << cs) - 1;
    s32 j0 = (s32)(((x - nlo) >> cs) & 511), j1 = (s32)(((y - 1 - nlo) >> cs) & 511);
    struct idx_span_t s = {.f0 = j0, .f1 = j1, .jl = -1, .jr = -1};
    if (x & cmask) {
        s.jl = j0;
        s.f0 = j0 + 1;
    }
    if (y & cmask) {
        s.jr = j1;
        s.f1 = j1 - 1;
    }
    return s;
}

/* The edge node of this level on one side, or none: 0 = the node holding a, 1 = holding b - 1
 * (skipped when it is the same node as side 0's and side 0 visits it). */
static __always_inline int idx_visits(struct idx_walk_t *w, int side, u64 *index) {
    u32 sh = (21 + 9 * (u32)w->level) & 63;
    u64 il = w->a >> sh, ir = (w->b - 1) >> sh;
    *index = side ? ir : il;
    if (side)
        return w->reach_r && !(ir == il && w->reach_l);
    return w->reach_l;
}

/* A set owes node n (at level, on side) the `any` bit of child j. */
static __always_inline void idx_pend(struct idx_walk_t *w, struct idx_node_t **nodes, s32 level, int side,
                                     struct idx_node_t *n, s32 j) {
    int at = (((level & 3) << 1) | side) & 7;
    w->pend_bit[at] = j;
    nodes[at] = n;
}

/* One level of a query. 1: [a, b) touches a tracked page; 0: not at this level. */
static __always_inline int idx_query_level(struct idx_walk_t *w, u32 pid) {
    u32 next_l = 0, next_r = 0;
    #pragma unroll
    for (int side = 0; side < 2; side++) {
        u64 index;
        if (!idx_visits(w, side, &index))
            continue;
        struct idx_node_t *n = idx_node(pid, w->gen, w->level, index, 0);
        if (!n)
            continue;
        struct idx_span_t s = idx_span(w, index);
        u64 hit = 0;
        #pragma unroll
        for (int i = 0; i < 8; i++)
            hit |= (n->full[i] | n->any[i]) & idx_mask(s.f0, s.f1, i);
        if (hit)
            return 1;
        if (s.jl >= 0) {
            if (idx_test(n->full, s.jl))
                return 1;
            next_l |= w->level > 0 && idx_test(n->any, s.jl);
        }
        if (s.jr >= 0) {
            if (idx_test(n->full, s.jr))
                return 1;
            next_r |= w->level > 0 && idx_test(n->any, s.jr);
        }
    }
    w->reach_l = next_l;
    w->reach_r = next_r;
    return 0;
}

/* One level of marking [a, b) tracked. 0 when a node could not be made (degraded). `nodes`
 * keeps, by level and side, the node whose `any` bit for the level below idx_set_finish sets. */
static __always_inline int idx_set_level(struct idx_walk_t *w, u32 pid, s32 level, struct idx_node_t **nodes) {
    u32 next_l = 0, next_r = 0;
    w->level = level;
    #pragma unroll
    for (int side = 0; side < 2; side++) {
        u64 index;
        if (!idx_visits(w, side, &index))
            continue;
        struct idx_node_t *n = idx_node(pid, w->gen, level, index, 1);
        if (!n)
            return 0;
        struct idx_span_t s = idx_span(w, index);
        #pragma unroll
        for (int i = 0; i < 8; i++)
            idx_or(&n->full[i], idx_mask(s.f0, s.f1, i));
        if (level == 0 && side == 0)
            nodes[0] = n;
        if (level > 0 && s.jl >= 0 && !idx_test(n->full, s.jl)) {
            next_l = 1;
            idx_pend(w, nodes, level, 0, n, s.jl);
        }
        if (level > 0 && s.jr >= 0 && !idx_test(n->full, s.jr)) {
            next_r = 1;
            idx_pend(w, nodes, level, 1, n, s.jr);
        }
    }
    w->reach_l = next_l;
    w->reach_r = next_r;
    return 1;
}

/* After the last level of a set: the parents' `any` bits, children first, on the nodes the walk
 * found (no lookup: a node lives as long as its generation). A bit found set on the way down is
 * checked again here, after the child's bits: a zap may have taken it since. */
static __always_inline void idx_set_finish(struct idx_walk_t *w, struct idx_node_t **nodes) {
    #pragma unroll
    for (int at = 2; at < 2 * (IDX_ROOT + 1); at++) {
        s32 j = w->pend_bit[at];
        struct idx_node_t *n = nodes[at];
        if (j >= 0 && n)
            idx_or(&n->any[(j >> 6) & 7], idx_bit(j));
    }
}

/* The lowest set bit of a nonzero word, without branches (the verifier walks every branch):
 * the population count of the bits below it. */
static __always_inline u32 idx_ctz(u64 x) {
    u64 v = (x & -x) - 1;
    v = v - ((v >> 1) & 0x5555555555555555ULL);
    v = (v & 0x3333333333333333ULL) + ((v >> 2) & 0x3333333333333333ULL);
    v = (v + (v >> 4)) & 0x0f0f0f0f0f0f0f0fULL;
    return (u32)((v * 0x0101010101010101ULL) >> 56) & 63;
}

/* Take a parent's `any` bit for child j away if the child is empty, and give it back if a
 * setter filled the child meanwhile. */
static __always_inline void idx_release(struct idx_node_t *parent, struct idx_node_t *child, u32 j) {
    j &= 511;
    if (!idx_empty(child))
        return;
    idx_andnot(&parent->any[j >> 6], idx_bit(j));
    if (!idx_empty(child))
        idx_or(&parent->any[j >> 6], idx_bit(j));
}

/* One level of marking [a, b) untracked (it was unmapped). Skipping any of it is safe. */
static __always_inline void idx_clear_level(struct idx_walk_t *w, u32 pid) {
    u32 next_l = 0, next_r = 0;
    s32 level = w->level;

    #pragma unroll
    for (int side = 0; side < 2; side++) {
        u64 index;
        if (!idx_visits(w, side, &index))
            continue;
        struct idx_node_t *n = idx_node(pid, w->gen, level, index, 0);
        if (!n)
            continue;
        struct idx_span_t s = idx_span(w, index);
        /* Wholly covered children: their `full` bits go; the nodes behind their `any` bits are
         * emptied afterwards (idx_zap, a program of its own for the verifier's sake). */
        u64 any = 0;
        #pragma unroll
        for (int i = 0; i < 8; i++) {
            u64 m = idx_mask(s.f0, s.f1, i);
            idx_andnot(&n->full[i], m);
            any |= n->any[i] & m;
        }
        if (level > 0 && any) {
            int at = ((((level - 1) & 3) << 1) | side) & 7;
            w->zap_node[at] = index;
            w->zap_f0[at] = s.f0;
            w->zap_f1[at] = s.f1;
        }
        if (level == 0)
            continue;
        #pragma unroll
        for (int e = 0; e < 2; e++) {
            s32 j = e ? s.jr : s.jl;
            if (j < 0)
                continue;
            if (idx_test(n->full, j)) {
                /* A wholly tracked child is cut: it gets a node with every bit set first. */
                struct idx_node_t *c = idx_node(pid, w->gen, level - 1, (index << 9) | (u32)j, 1);
                if (!c)
                    return;
                #pragma unroll
                for (int k = 0; k < 8; k++)
                    idx_or(&c->full[k], ~0ULL);
                idx_or(&n->any[(j >> 6) & 7], idx_bit(j));
                idx_andnot(&n->full[(j >> 6) & 7], idx_bit(j));
            } else if (!idx_test(n->any, j)) {
                continue;
            }
            if (e)
                next_r = 1;
            else
                next_l = 1;
        }
    }
    w->reach_l = next_l;
    w->reach_r = next_r;
}

/* After a clear: on each side of each level, empty the node of the first wholly covered child
 * that has one; the others, and the grandchildren of an emptied one, keep stale bits (over-set:
 * safe, less precise). */
static __always_inline void idx_zap(struct idx_walk_t *w, u32 pid) {
    u64 *z = idx_zaps();
    if (!z)
        return;   /* a zap not done leaves bits over-set: safe */
    __sync_fetch_and_add(z, 1);
    #pragma unroll
    for (int at = 0; at < 4; at++) {
        s32 f0 = w->zap_f0[at], f1 = w->zap_f1[at];
        if (f0 < 0)
            continue;
        s32 level = (at >> 1) + 1;
        u64 index = w->zap_node[at];
        struct idx_node_t *n = idx_node(pid, w->gen, level, index, 0);
        if (!n)
            continue;
        s32 pick = -1;
        #pragma unroll
        for (int i = 0; i < 8; i++) {
            u64 zap = n->any[i] & idx_mask(f0, f1, i);
            if (pick < 0 && zap)
                pick = (s32)(((u32)i << 6) | idx_ctz(zap));
        }
        if (pick < 0)
            continue;
        u32 j = (u32)pick & 511;
        struct idx_node_t *c = idx_node(pid, w->gen, level - 1, (index << 9) | j, 0);
        if (!c)
            continue;
        #pragma unroll
        for (int k = 0; k < 8; k++) {
            __sync_fetch_and_and(&c->full[k], 0);
            __sync_fetch_and_and(&c->any[k], 0);
        }
        idx_release(n, c, j);
    }
    __sync_fetch_and_add(z, 1);
}

/* Whole walks of one root, one level a turn of a bounded loop. */
static __always_inline int idx_query(struct idx_walk_t *w, u32 pid) {
    for (int turn = 0; turn <= IDX_ROOT; turn++) {
        if (idx_query_level(w, pid))
            return 1;
        if (--w->level < 0 || !(w->reach_l || w->reach_r))
            return 0;
    }
    return 0;
}

/* [a, b) within one 2 MiB block: its pages are bits of one level-0 node. */
static __always_inline int idx_in_block(struct idx_walk_t *w) {
    return w->b > w->a && (w->a >> 21) == ((w->b - 1) >> 21);
}

static __always_inline u64 idx_block_mask(struct idx_walk_t *w, int i) {
    return idx_mask((s32)((w->a >> 12) & 511), (s32)(((w->b - 1) >> 12) & 511), i);
}

/* Whether a level-0 node holds a bit of the walk's pages (a range within its block). */
static __always_inline int idx_block_hit(struct idx_node_t *n, struct idx_walk_t *w) {
    u64 hit = 0;
    #pragma unroll
    for (int i = 0; i < 8; i++)
        hit |= n->full[i] & idx_block_mask(w, i);
    return hit != 0;
}

/* A set within one block whose node a walk linked since the last zap: its bits, nothing more.
 * The common case (an mmap of less than 2 MiB next to earlier ones) costs one lookup instead of
 * a walk's three and the `any` bits' re-checks. 1 when done. */
static __always_inline int idx_set_fast(struct idx_walk_t *w, u32 pid) {
    u64 *z = idx_zaps();
    if (!z || !idx_in_block(w))
        return 0;
    u64 before = *z;
    if (before & 1)
        return 0;
    struct idx_node_t *n = idx_node(pid, w->gen, 0, w->a >> 21, 0);
    if (!n || n->linked != before + 1)
        return 0;
    #pragma unroll
    for (int i = 0; i < 8; i++)
        idx_or(&n->full[i], idx_block_mask(w, i));
    /* A zap that began meanwhile may have unlinked it: then walk, which links it again. */
    return *(volatile u64 *)z == before;
}

static __always_inline u64 *idx_bigsets(void) {
    int zero = 0;
    return bigsets.lookup(&zero);
}

/* Whether [a, b) covers a whole 2 MiB block: then its set writes `full` bits above level 0. */
static __always_inline int idx_big(u64 a, u64 b) {
    return ((a + (1ULL << 21) - 1) & ~((1ULL << 21) - 1)) + (1ULL << 21) <= b;
}

static __always_inline int idx_set_walk(struct idx_walk_t *w, u32 pid) {
    u64 *z = idx_zaps();
    u64 before = z ? *z : 1;
    struct idx_node_t *nodes[2 * (IDX_ROOT + 1)] = {};
    #pragma unroll
    for (int turn = 0; turn <= IDX_ROOT; turn++) {
        if (!idx_set_level(w, pid, IDX_ROOT - turn, nodes))
            return 0;
        if (IDX_ROOT - turn == 0 || !(w->reach_l || w->reach_r))
            break;
    }
    idx_set_finish(w, nodes);
    /* Linked: every `any` bit from the root to this node is set, and no zap ran meanwhile. */
    struct idx_node_t *n = nodes[0];
    if (n && z && !(before & 1) && idx_in_block(w) && *(volatile u64 *)z == before)
        n->linked = before + 1;
    return 1;
}

static __always_inline int idx_set(struct idx_walk_t *w, u32 pid) {
    if (idx_set_fast(w, pid))
        return 1;
    u64 *big = idx_big(w->a, w->b) ? idx_bigsets() : 0;
    if (big)
        __sync_fetch_and_add(big, 1);   /* odd: what clear_above remembers may change */
    int done = idx_set_walk(w, pid);
    if (big)
        __sync_fetch_and_add(big, 1);
    return done;
}

/* A clear within one block that has some of its bits on a level-0 node: they go, the walk is
 * skipped. (A `full` bit of an ancestor over the block, left from a larger mapping, would stay:
 * over-set, which is safe.) 1 when done. */
static __always_inline int idx_clear_fast(struct idx_walk_t *w, u32 pid) {
    if (!idx_in_block(w))
        return 0;
    struct idx_node_t *n = idx_node(pid, w->gen, 0, w->a >> 21, 0);
    if (!n || !idx_block_hit(n, w))
        return 0;
    #pragma unroll
    for (int i = 0; i < 8; i++)
        idx_andnot(&n->full[i], idx_block_mask(w, i));
    return 1;
}

static __always_inline void idx_clear(struct idx_walk_t *w, u32 pid) {
    if (idx_clear_fast(w, pid))
        return;
    for (int turn = 0; turn <= IDX_ROOT; turn++) {
        idx_clear_level(w, pid);
        if (--w->level < 0 || !(w->reach_l || w->reach_r))
            break;
    }
}

/* The slot of clear_above for a block. */
static __always_inline struct idx_block_t *idx_block_memo(u32 pid, u64 block) {
    u32 i = slot_index(block ^ pid, IDX_BLOCKS);   /* mmap_ledger.c's, defined before this */
    return clear_above.lookup(&i);
}

/* A query of a range within one 2 MiB block, bottom-up: when this CPU remembers that no `full`
 * bit above level 0 covered the block, and no big set has begun since, the block's level-0 node
 * alone says whether a page of the range is tracked (no node: none is). One lookup instead of
 * the walk's three. Returns 1 (tracked), 0 (not), or -1 (not known here: walk). *seen: the
 * big-set count read first, for idx_remember_block after a walk. */
static __always_inline int idx_query_block(struct idx_walk_t *w, u32 pid, u64 *seen) {
    u64 *big = idx_bigsets();
    *seen = 1;
    if (!big || !idx_in_block(w) || idx_degraded())
        return -1;   /* degraded: a node may be missing, and bits with it */
    u64 now = *(volatile u64 *)big, block = w->a >> 21;
    *seen = now;
    struct idx_block_t *m = idx_block_memo(pid, block);
    if (!m || (now & 1) || m->bigsets != now || m->block != block || m->pid != pid || m->gen != w->gen)
        return -1;
    struct idx_node_t *n = idx_node(pid, w->gen, 0, block, 0);
    return n && idx_block_hit(n, w);
}

/* After a walk found nothing for a range within one block: no `full` bit above level 0 covers
 * the block, as of the big-set count `seen` read before the walk (when even, and unchanged). */
static __always_inline void idx_remember_block(struct idx_walk_t *w, u32 pid, u64 seen) {
    u64 *big = idx_bigsets();
    if (!big || (seen & 1) || *(volatile u64 *)big != seen || !idx_in_block(w))
        return;
    struct idx_block_t *m = idx_block_memo(pid, w->a >> 21);
    if (!m)
        return;
    m->pid = pid; m->gen = w->gen; m->block = w->a >> 21; m->bigsets = seen;
}
