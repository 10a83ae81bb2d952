/*
 * mmap_ledger.c - BCC program: outstanding mmaps of a process tree, by caller, kept in the kernel.
 *
 * Traces mmap, munmap, mremap, brk, shmat, shmdt and memfd_create of TARGET (plus, with FOLLOW=1,
 * the children it forks after the start: `traced`), all threads, with one program on the raw
 * sys_exit tracepoint: it hands over the user registers, where the arguments still are at exit,
 * so nothing is carried from the entry; at 100k mmap/s this costs a fraction of the per-syscall
 * tracepoints (see bench/trace.py). The caller is the return address of the libc wrapper, read at
 * the stack slot user space found in libc's CFI (`ra_slot`, default sp+0).
 *
 * The common case never leaves the kernel: an mmap goes into `live` and its exact munmap or
 * mremap updates it there, with per-site sums in `sites` (the same scheme as BCC's memleak).
 * Under a storm most mappings die young, so each CPU keeps its newest in a slot of its own (the
 * nursery) and the recent sites' sums in per-CPU tallies: a balanced pair then touches no shared
 * hash map but the range index.
 * An unmap that touches no tracked mapping (libucm's hooks make tens of thousands of munmaps of
 * holes a second) is decided here too, by the range index of range_index.h, and only counted.
 * The index's query, set and clear are programs of their own (`steps`, tail calls): the verifier
 * takes no more in one program.
 * What is left (unmaps that cut a tracked mapping, MAP_FIXED over one, brk, shm*, memfd_create,
 * a full `live`) goes to the ring buffer as a CALL record, with 16 stack words when the wrapper's
 * return-address slot is unknown, without waking the reader (it polls).
 *
 * A site is (pid, ip, ra, path): `path` hashes the return addresses past the caller, read through
 * unwinding rules user space installs in `rules` once an exemplar showed it the frames. So two
 * paths through one wrapper (libucm's balanced mmap hook and its leaking pool growth both return
 * into ucm_orig_mmap_syscall) are two sites, and the first call of each sends an EXEMPLAR with
 * STACK_BYTES of stack for DWARF unwinding: the stack shown for outstanding memory is the stack of
 * the calls that made it. A failed ring buffer reservation is counted in `counters`: losses are
 * exact. With STREAM_ALL=1 every call is streamed and the kernel keeps no ledger (--all-events).
 *
 * Arguments (-D): TARGET, FOLLOW, MIN_LEN, STREAM_ALL, LIVE_MAX, SITES_MAX, IDX_MAX, IDX_BLOCKS,
 * RULES_MAX, PATH_DEPTH, STACK_TOP_WORDS, MEMO_SIZE, PATHS_SIZE, TALLY_SIZE, NURSERY, NCPUS, the
 * NURSERY_* claim words, RINGBUF_PAGES, STACK_BYTES, the NR_* syscall numbers, MAP_FIXED,
 * MAP_FIXED_NOREPLACE, MREMAP_DONTUNMAP and the record/counter numbering, all supplied by
 * leakhunt.trace.bcc.cflags(). Read by leakhunt.trace.bcc; by hand:
 *     python -m leakhunt.trace.bcc PID      # prints the cflags
 *
 * Example (ucx_storm: a UCX registration cache fed by libucm's munmap hook, as leakhunt reads it):
 *     live  {pid 4242, addr 0x7f3a2b000000} -> {len 1052672, ip libc!syscall+0x19,
 *            ra libucm!ucm_orig_mmap_syscall+0x20, path 0x9c3e..., ts 1520391416401}
 *     sites {4242, libc!syscall+0x19, libucm!ucm_orig_mmap_syscall+0x20, 0x9c3e...}
 *            -> {count 231, mapped 243163136, unmapped 0}          (the pool: ucs_mpool_grow)
 *     sites {4242, libc!syscall+0x19, libucm!ucm_orig_mmap_syscall+0x20, 0x41d7...}
 *            -> {count 785089, mapped 51452166144, unmapped 51452166144}   (balanced: ucm_mmap)
 *     counters untracked 566012    (munmaps of holes, never streamed)
 */
#include <uapi/linux/ptrace.h>
#include <linux/sched.h>

/* Record types (REC_*), lifecycle kinds (PROC_*), the per-CPU counters' indexes (C_*: one per
 * syscall, IDX_*, then the others) come from leakhunt.trace.bcc as -D: it reads them back. */

struct call_t { u64 nr; u64 a[5]; u64 ip; u64 sp; u64 ra; u64 bp; u64 path; u64 cfa; };
struct live_key_t { u32 pid; u32 pad; u64 addr; };
struct live_val_t { u64 len; u64 ip; u64 ra; u64 path; u64 ts; u32 flags; s32 fd; };
struct site_key_t { u32 pid; u32 pad; u64 ip; u64 ra; u64 path; };
struct site_val_t { u64 count; u64 mapped; u64 unmapped; };
/* How to step out of the frame that returns to a pc: CFA = sp + cfa, the return address at CFA + ra. */
struct rule_t { s32 cfa; s32 ra; };

struct call_rec_t {
    u32 type; u32 pid; u32 tid; u32 nr; u64 ts; u64 a[5]; s64 ret; u64 ip; u64 sp; u64 ra; u64 path;
    u64 nwords;      /* 16 when the return-address slot of ip was unknown, else 0 */
    u64 words[16];
};
struct exemplar_rec_t {
    u32 type; u32 pid; u64 ts; u64 ip; u64 ra; u64 sp; u64 bp; u64 path; u32 nbytes; u32 pad;
    u8 stack[STACK_BYTES];
};
struct proc_rec_t { u32 type; u32 pid; u32 kind; u32 child; u64 ts; };

BPF_HASH(traced, u32, u8, 4096);
BPF_HASH(ra_slot, u64, u32, 4096);
BPF_HASH(rules, u64, struct rule_t, RULES_MAX);
BPF_F_TABLE("hash", struct live_key_t, struct live_val_t, live, LIVE_MAX, 0);
BPF_F_TABLE("hash", struct site_key_t, struct site_val_t, sites, SITES_MAX, BPF_F_NO_PREALLOC);
BPF_PERCPU_ARRAY(counters, u64, C_COUNT);
BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);   /* CALL records only: one size, read in bulk */
BPF_RINGBUF_OUTPUT(rare, RARE_PAGES);        /* EXEMPLAR and PROC records */

/* A key's slot in a direct-mapped table of `size` entries (a power of two): the
 * memo, the path memo and the tallies here, and the index's block memo. */
static __always_inline u32 slot_index(u64 key, u32 size) {
    return (u32)((key * 0x9e3779b97f4a7c15ULL) >> 40) & (size - 1);
}

#include "range_index.h"

/* One call on its way through the programs (per CPU: a handler runs to its end on one CPU). The
 * entry reads the call, queries the range index and decides; clearing and setting the index run
 * next, each a program of its own reached by tail call (`steps`), to stay within what the
 * verifier takes. */
struct state_t {
    struct call_t c;
    s64 ret;
    u32 pid, tid;
    u32 slot_known;
    u32 gen;                        /* the process's generation in the range index */
    u64 q_lo, q_hi;                 /* what the index is asked about (step_query, step_nursery) */
    u64 seen;                       /* the big-set count idx_query_block read (idx_remember_block) */
    u32 held_nursery;               /* held is a mapping taken from a nursery slot, not `live` */
    struct live_val_t held;
    u64 c_lo, c_hi, s_lo, s_hi;    /* what to clear, then set, in the index once decided */
    struct idx_walk_t w;
    struct pt_regs regs;
    u64 epoch;                      /* facts_epoch as this call began */
    u32 top_ok;                     /* top holds the STACK_TOP_WORDS words of the user stack at sp */
    u64 top[STACK_TOP_WORDS];
};
BPF_PERCPU_ARRAY(state, struct state_t, 1);
BPF_PROG_ARRAY(steps, STEP_COUNT);
BPF_ARRAY(ready, u32, 1);   /* set by user space once `steps` is filled: tracing starts then */

/* What user space installs in ra_slot and rules, remembered per CPU: an mmap asks for up to
 * PATH_DEPTH + 1 of them, each a hash lookup (~20 ns here; perf on hook_storm put the hash
 * lookups first among the probe's costs).
 * Direct-mapped, MEMO_SIZE entries; an entry remembers an absence too. User space bumps
 * `facts_epoch` after each change to those maps, and only entries of the current epoch count.
 * No entry is seen half written: the kernel runs this program once at a time on a CPU (a run
 * that would nest in another, say after a preemption, is skipped and counted as a miss). */
struct memo_t { u64 key; u64 epoch; s32 a; s32 b; };
BPF_PERCPU_ARRAY(memo, struct memo_t, MEMO_SIZE);
BPF_ARRAY(facts_epoch, u64, 1);
/* The range index's generations (`gens`) are remembered there too: every change to them (exec,
 * exit) is counted here, and the memo's epoch is the sum of both counts. */
BPF_ARRAY(gens_changed, u64, 1);

static __always_inline struct memo_t *memo_at(u64 key) {
    u32 i = slot_index(key, MEMO_SIZE);
    return memo.lookup(&i);
}

/* 1 when the entry holds key's fact for this epoch: *a, *b are it (epoch's low bit: present). */
static __always_inline int memo_get(struct memo_t *m, u64 key, u64 epoch, int *present, s32 *a, s32 *b) {
    if (!m || m->key != key || (m->epoch >> 1) != epoch)
        return 0;
    *present = m->epoch & 1;
    *a = m->a;
    *b = m->b;
    return 1;
}

static __always_inline void memo_put(struct memo_t *m, u64 key, u64 epoch, int present, s32 a, s32 b) {
    if (!m)
        return;
    u64 e = (epoch << 1) | (present ? 1 : 0);
    m->key = key; m->epoch = e; m->a = a; m->b = b;
}

static __always_inline u64 facts_epoch_now(void) {
    int zero = 0;
    u64 *e = facts_epoch.lookup(&zero), *g = gens_changed.lookup(&zero);
    return (e ? *e : 0) + (g ? *g : 0);
}

/* Where the wrapper that made the syscall at ip keeps its return address (ra_slot). Its memo key
 * has bit 62 set, beside rules' keys (user addresses are below 2^47). */
static __always_inline int slot_of(u64 ip, u64 epoch, u32 *slot) {
    u64 key = ip | (1ULL << 62);
    struct memo_t *m = memo_at(key);
    int present = 0;
    s32 a = 0, b = 0;
    if (memo_get(m, key, epoch, &present, &a, &b)) {
        *slot = (u32)a;
        return present;
    }
    u32 *v = ra_slot.lookup(&ip);
    present = v != 0;
    *slot = v ? *v : 0;
    memo_put(m, key, epoch, present, (s32)*slot, 0);
    return present;
}

/* How to step out of the frame that returns to pc (rules). */
static __always_inline int rule_of(u64 pc, u64 epoch, struct rule_t *rule) {
    struct memo_t *m = memo_at(pc);
    int present = 0;
    s32 a = 0, b = 0;
    if (memo_get(m, pc, epoch, &present, &a, &b)) {
        rule->cfa = a;
        rule->ra = b;
        return present;
    }
    struct rule_t *r = rules.lookup(&pc);
    present = r != 0;
    if (r) {
        rule->cfa = r->cfa;
        rule->ra = r->ra;
    }
    memo_put(m, pc, epoch, present, r ? rule->cfa : 0, r ? rule->ra : 0);
    return present;
}

/* The process's generation in the range index (`gens`; its memo key has bit 61 set). */
static __always_inline u32 gen_of(u32 pid, u64 epoch) {
    u64 key = (u64)pid | (1ULL << 61);
    struct memo_t *m = memo_at(key);
    int present = 0;
    s32 a = 0, b = 0;
    if (memo_get(m, key, epoch, &present, &a, &b))
        return (u32)a;
    u32 *g = gens.lookup(&pid);
    u32 gen = g ? *g : 0;
    memo_put(m, key, epoch, 1, (s32)gen, 0);
    return gen;
}

/* Whether v, the `live` entry at an unmap's address, is exactly what the call takes away: a
 * munmap of its length, or an mremap of it that does not keep the old range. */
static __always_inline int exact_hit(struct live_val_t *v, u64 nr, u64 len, u64 flags) {
    return v && v->len == len && (nr == NR_MUNMAP || (nr == NR_MREMAP && !(flags & MREMAP_DONTUNMAP)));
}

static __always_inline int kind_index(u64 nr) {
    switch (nr) {
    case NR_MMAP: return IDX_MMAP;
    case NR_MUNMAP: return IDX_MUNMAP;
    case NR_MREMAP: return IDX_MREMAP;
    case NR_BRK: return IDX_BRK;
    case NR_SHMAT: return IDX_SHMAT;
    case NR_SHMDT: return IDX_SHMDT;
    case NR_MEMFD_CREATE: return IDX_MEMFD_CREATE;
    }
    return -1;
}

static __always_inline void count(int index, u64 n) {
    u64 *c = counters.lookup(&index);
    if (c)
        *c += n;   /* per-CPU: no atomics needed */
}

static __always_inline u64 page_round(u64 n) { return (n + 4095) & ~4095ULL; }

/* Reading user memory is the costliest thing a call does here: about 170 ns a read on this
 * kernel, whether of 8 bytes or of 512. So the words a call needs from the user stack (the
 * wrapper's return address, the path's return addresses above it) come from one copy of its
 * top, and are read one by one only where they lie past it. */
static __always_inline void copy_stack_top(struct state_t *st) {
    st->top_ok = bpf_probe_read_user(st->top, sizeof(st->top), (void *)st->c.sp) == 0;
}

static __always_inline int user_word(struct state_t *st, u64 addr, u64 *out) {
    u64 at = addr - st->c.sp, i = at >> 3;
    if (st->top_ok && addr >= st->c.sp && !(at & 7) && i < STACK_TOP_WORDS) {
        asm volatile("" : "+r"(i));   /* keep the mask: the verifier needs to see the bound */
        *out = st->top[i & (STACK_TOP_WORDS - 1)];
        return 0;
    }
    return bpf_probe_read_user(out, 8, (void *)addr);
}

/* The wrapper's return address: the call site's key. An unmap only needs it when it is streamed
 * (a kernel-ledger hit is keyed by its mapping's own site, an unmap of a hole by nothing). */
static __always_inline void load_ra(struct state_t *st) {
    u32 slot = 0;
    st->slot_known = slot_of(st->c.ip, st->epoch, &slot);
    u64 ra_off = slot & 0xfff;      /* where the wrapper's return address is, from sp */
    st->c.cfa = st->c.sp + ra_off + 8;
    copy_stack_top(st);
    if (user_word(st, st->c.sp + ra_off, &st->c.ra) != 0)
        st->c.ra = 0;
}

/* The last walk from each return address, per CPU, direct-mapped (PATHS_SIZE entries): where it
 * found the path's return addresses, as offsets from the caller's CFA, and what they were. The
 * rule that steps out of a frame depends on its pc alone, so a call whose stack holds the same
 * return addresses at those offsets walks the same way: its path is the entry's hash, for one
 * entry and PATH_DEPTH word compares instead of a rule lookup per frame (an mmap storm comes
 * from a handful of paths). Only a walk that ended for want of a rule, or at PATH_DEPTH, is
 * kept: one that ended on a word it could not read says nothing about the next call's words. */
struct path_memo_t { u64 ra; u64 epoch; u64 hash; u32 depth; u32 pad; s32 off[PATH_DEPTH]; u64 pc[PATH_DEPTH]; };
BPF_PERCPU_ARRAY(paths, struct path_memo_t, PATHS_SIZE);

/* The path past the caller: the return addresses of up to PATH_DEPTH frames above it, found
 * with the rules user space learned from exemplars, hashed. 0 until a rule for ra is known. */
static __always_inline u64 path_of(struct state_t *st, u64 ra, u64 cfa) {
    u32 i = slot_index(ra, PATHS_SIZE);
    struct path_memo_t *m = paths.lookup(&i);
    if (m && m->ra == ra && m->epoch == st->epoch + 1) {
        int same = 1;
        #pragma unroll
        for (int d = 0; d < PATH_DEPTH; d++) {
            u64 w = 0;
            if (same && d < m->depth && (user_word(st, cfa + (s64)m->off[d], &w) != 0 || w != m->pc[d]))
                same = 0;
        }
        if (same)
            return m->hash;
    }
    u64 h = 0, pc = ra, sp = cfa;
    u32 depth = 0, kept = 1;
    s32 off[PATH_DEPTH] = {};
    u64 pcs[PATH_DEPTH] = {};
    #pragma unroll
    for (int d = 0; d < PATH_DEPTH; d++) {
        struct rule_t r;
        if (!rule_of(pc, st->epoch, &r))
            break;
        u64 up = sp + (s64)r.cfa, at = up + (s64)r.ra, next = 0;
        if (user_word(st, at, &next) != 0 || next == 0) {
            kept = 0;
            break;
        }
        if ((s64)(s32)(at - cfa) != (s64)(at - cfa))
            kept = 0;   /* an offset the entry cannot hold (a frame on another stack) */
        h = (h ^ next) * 0x100000001b3ULL;
        off[d] = (s32)(at - cfa);
        pcs[d] = next;
        depth = d + 1;
        pc = next;
        sp = up;
    }
    if (m && kept) {
        m->ra = ra; m->epoch = st->epoch + 1; m->hash = h; m->depth = depth;
        #pragma unroll
        for (int d = 0; d < PATH_DEPTH; d++) {
            m->off[d] = off[d];
            m->pc[d] = pcs[d];
        }
    }
    return h;
}

/* Per-site sums in `sites`; returns 1 when the site is new (its first call sends an exemplar).
 * When the table is full a new path falls back to its site's path 0, so no call goes uncounted. */
static __always_inline int site_add_shared(u32 pid, u64 ip, u64 ra, u64 path, u64 count_n, u64 mapped, u64 unmapped) {
    struct site_key_t k = {.pid = pid, .ip = ip, .ra = ra, .path = path};
    struct site_val_t *v = sites.lookup(&k);
    int fresh = 0;
    if (!v) {
        struct site_val_t zero = {};
        fresh = sites.insert(&k, &zero) == 0;
        v = sites.lookup(&k);
        if (!v) {
            k.path = 0;
            sites.insert(&k, &zero);
            v = sites.lookup(&k);
            if (!v)
                return 0;
        }
    }
    if (count_n)
        __sync_fetch_and_add(&v->count, count_n);
    if (mapped)
        __sync_fetch_and_add(&v->mapped, mapped);
    if (unmapped)
        __sync_fetch_and_add(&v->unmapped, unmapped);
    return fresh;
}

/* The sums of the sites a CPU's calls came from lately, direct-mapped, TALLY_SIZE of them: a
 * balanced pair adds to its site twice, and in `sites` that was a hash lookup and locked adds
 * each time. Here it is an array slot and plain adds (per CPU, and one run of the program at a
 * time on a CPU: the kernel skips a run that would nest in another). A site that takes a slot
 * moves the slot's sums to `sites` first. User space adds the slots of every CPU to `sites`. */
struct tally_t { u64 ip; u64 ra; u64 path; u32 pid; u32 used; u64 count; u64 mapped; u64 unmapped; };
BPF_PERCPU_ARRAY(tallies, struct tally_t, TALLY_SIZE);

static __always_inline int site_add(u32 pid, u64 ip, u64 ra, u64 path, u64 count_n, u64 mapped, u64 unmapped) {
    u32 i = slot_index(ip ^ (ra * 31) ^ (path * 17) ^ pid, TALLY_SIZE);
    struct tally_t *t = tallies.lookup(&i);
    if (!t)
        return site_add_shared(pid, ip, ra, path, count_n, mapped, unmapped);
    if (t->used && t->pid == pid && t->ip == ip && t->ra == ra && t->path == path) {
        t->count += count_n;
        t->mapped += mapped;
        t->unmapped += unmapped;
        return 0;
    }
    /* A site new to this slot: its call goes to `sites` (which says whether the site is new
     * everywhere), the slot's old sums too, and the slot is the new site's from now on. */
    int fresh = site_add_shared(pid, ip, ra, path, count_n, mapped, unmapped);
    if (t->used && (t->count | t->mapped | t->unmapped))
        site_add_shared(t->pid, t->ip, t->ra, t->path, t->count, t->mapped, t->unmapped);
    t->ip = ip; t->ra = ra; t->path = path; t->pid = pid; t->used = 1;
    t->count = 0; t->mapped = 0; t->unmapped = 0;
    return fresh;
}

static __always_inline void send_exemplar(u32 pid, struct call_t *c) {
    struct exemplar_rec_t *x = rare.ringbuf_reserve(sizeof(struct exemplar_rec_t));
    if (!x) {
        count(C_LOST_EXEMPLAR, 1);
        return;
    }
    x->type = REC_EXEMPLAR; x->pid = pid; x->ts = bpf_ktime_get_ns();
    x->ip = c->ip; x->ra = c->ra; x->sp = c->sp; x->bp = c->bp; x->path = c->path; x->pad = 0;
    /* Near the top of a stack a long read faults: try shorter copies. */
    x->nbytes = STACK_BYTES;
    if (bpf_probe_read_user(x->stack, STACK_BYTES, (void *)c->sp) != 0) {
        x->nbytes = STACK_BYTES / 4;
        if (bpf_probe_read_user(x->stack, STACK_BYTES / 4, (void *)c->sp) != 0) {
            x->nbytes = 256;
            if (bpf_probe_read_user(x->stack, 256, (void *)c->sp) != 0)
                x->nbytes = 0;
        }
    }
    rare.ringbuf_submit(x, BPF_RB_NO_WAKEUP);
}

/* A streamed call. The stack words only travel when user space has not told us where the return
 * address is for this ip (`ra_slot`): then it finds it itself, from CFI over the words. */
static __always_inline void stream(u32 pid, u32 tid, struct call_t *c, s64 ret, int slot_known) {
    struct call_rec_t *r = events.ringbuf_reserve(sizeof(struct call_rec_t));
    if (!r) {
        count(C_LOST_CALL, 1);
        return;
    }
    r->type = REC_CALL; r->pid = pid; r->tid = tid; r->nr = c->nr; r->ts = bpf_ktime_get_ns();
    #pragma unroll
    for (int i = 0; i < 5; i++)
        r->a[i] = c->a[i];
    r->ret = ret; r->ip = c->ip; r->sp = c->sp; r->ra = c->ra; r->path = c->path;
    r->nwords = slot_known ? 0 : 16;
    if (!slot_known && bpf_probe_read_user(r->words, sizeof(r->words), (void *)c->sp) != 0)
        __builtin_memset(r->words, 0, sizeof(r->words));
    events.ringbuf_submit(r, BPF_RB_NO_WAKEUP);
}

static __always_inline struct state_t *current_state(void) {
    int zero = 0;
    return state.lookup(&zero);
}

/* The nursery: per CPU, the last mapping an mmap made there, held in a slot of its own instead of
 * `live`. Most mappings of a storm die young (a malloc's arena, libucm's hook: the munmap follows
 * on the same thread), and a slot costs no hash-map work: the pair's `live` insert, lookup and
 * delete were a third of the probe's cost. The next mmap on the CPU moves the slot's mapping to
 * `live` (evicts it); an exact munmap on the CPU takes it back (cancels it).
 * The mapping is in the range index as any tracked one is, so an unmap on another CPU that
 * touches it finds overlap there and scans every CPU's slot (step_nursery): an exact munmap
 * cancels it, anything else moves it to `live` first, and is then decided as before.
 * `addr` is the slot's claim word: NURSERY_EMPTY, NURSERY_CANCELLED (another CPU cancelled it:
 * an eviction that raced it takes its `live` copy back), NURSERY_BUSY (being filled), or the
 * mapping's address once its fields are written. Other CPUs act only on a slot that holds a
 * mapping, so a slot's own CPU fills an empty one with plain stores; a slot that holds one
 * changes by compare-and-swap only.
 * Whoever moves a mapping to `live` writes `live` first and claims after, so a mapping is always
 * in one of the two, and both writers write the same entry. User space reads the slots with
 * `live` (NCPUS: the possible CPUs). */
struct nursery_t { u64 addr; u32 pid; u32 pad; struct live_val_t v; };
BPF_ARRAY(nursery, struct nursery_t, NCPUS);

static __always_inline struct nursery_t *nursery_mine(void) {
    u32 cpu = bpf_get_smp_processor_id();
    return nursery.lookup(&cpu);
}

static __always_inline u64 nursery_cas(struct nursery_t *s, u64 old, u64 new) {
    return __sync_val_compare_and_swap(&s->addr, old, new);
}

/* Put a new mapping in this CPU's slot, moving what it held to `live`. 0 when the slot is not to
 * be had (`live` is full, or another CPU's scan holds it): the caller keeps the mapping. */
static __always_inline int nursery_put(u32 pid, u64 addr, struct live_val_t *nv) {
    struct nursery_t *s = nursery_mine();
    if (!s || !NURSERY)
        return 0;
    u64 a = s->addr;
    if (a == NURSERY_BUSY)
        return 0;
    if (a >= NURSERY_FIRST) {
        struct live_key_t k = {.pid = s->pid, .addr = a};
        struct live_val_t old = s->v;
        if (*(volatile u64 *)&s->addr != a)
            return 0;
        if (live.update(&k, &old) != 0) {
            count(C_FULL, 1);
            return 0;
        }
        u64 r = nursery_cas(s, a, NURSERY_BUSY);
        if (r != a) {
            /* Moved to `live` by another CPU (EMPTY: the same entry), or cancelled by an exact
             * munmap there: then the copy just written is stale. */
            if (r == NURSERY_CANCELLED)
                live.delete(&k);
            if ((r != NURSERY_EMPTY && r != NURSERY_CANCELLED) || nursery_cas(s, r, NURSERY_BUSY) != r)
                return 0;
        }
    } else if (a != NURSERY_EMPTY && a != NURSERY_CANCELLED) {
        return 0;
    }
    /* An empty slot is this CPU's alone (other CPUs act only on a slot that holds a mapping):
     * its fields are filled without a claim, and the address published last. */
    s->pid = pid;
    s->v = *nv;
    /* Published by a plain store after the fields: x86 keeps stores in order (and loads: a
     * reader that sees the address sees the fields); the barrier keeps the compiler's order. */
    asm volatile("" ::: "memory");
    *(volatile u64 *)&s->addr = addr;
    return 1;
}

/* An exact munmap of this CPU's slot: the mapping, taken back into *held. 1 when taken. */
static __always_inline int nursery_cancel(struct state_t *st, u64 addr, u64 len) {
    struct nursery_t *s = nursery_mine();
    if (!s || s->addr != addr || s->pid != st->pid || s->v.len != len || addr < NURSERY_FIRST)
        return 0;
    st->held = s->v;
    return nursery_cas(s, addr, NURSERY_EMPTY) == addr;
}

/* A step that did not run (the kernel refused the tail call) may have left the index short
 * of bits it needs: from then on nothing is decided from it. */
static __always_inline void step_failed(void) {
    count(C_STEP_FAILED, 1);
    idx_degrade();
}

/* After the decision: clear what was unmapped, then set what was mapped, each in a program of
 * its own, one root at a time (each program comes back here for the rest of its range). */
static __always_inline void update_index(void *ctx, struct state_t *st) {
    if (idx_degraded()) {
        st->c_hi = st->c_lo = st->s_hi = st->s_lo = 0;
        return;
    }
    if (st->c_hi > st->c_lo) {
        st->c_lo = idx_begin(&st->w, st->gen, st->c_lo, st->c_hi, 1);
        steps.call(ctx, STEP_CLEAR);
        step_failed();
        return;
    }
    if (st->s_hi > st->s_lo) {
        st->s_lo = idx_begin(&st->w, st->gen, st->s_lo, st->s_hi, 1);
        steps.call(ctx, STEP_SET);
        step_failed();
    }
}

/* The decision: the kernel ledger, per-site sums, what goes to user space. */
static __always_inline void decide(void *ctx, struct state_t *st, struct live_val_t *v, int overlap, int queried) {
    struct call_t *c = &st->c;
    u64 nr = c->nr;
    u32 pid = st->pid;
    s64 ret = st->ret;
    u64 len = page_round(c->a[1]), nlen = page_round(c->a[2]);
    int send = 0;
    /* The one site this call adds to (one inlined site_add: the verifier's time), and whether
     * its first call sends an exemplar (not an unmap's, nor an exact move's). */
    int site = 0, exemplar = 1;
    u64 sip = c->ip, sra = c->ra, spath = c->path, scount = 0, smapped = 0, sunmapped = 0;

    if (nr == NR_MMAP) {
        if (overlap) {
            send = 1;      /* MAP_FIXED over tracked memory: user space cuts, then keeps it */
            site = 1;
        } else if (len < MIN_LEN) {
            count(C_FILTERED, 1);
            len = 0;
        } else {
            struct live_key_t nk = {.pid = pid, .addr = (u64)ret};
            struct live_val_t nv = {.len = len, .ip = c->ip, .ra = c->ra, .path = c->path,
                                    .ts = bpf_ktime_get_ns(), .flags = (u32)c->a[3], .fd = (s32)c->a[4]};
            site = 1;
            if (!nursery_put(pid, (u64)ret, &nv) && live.update(&nk, &nv) != 0) {
                count(C_FULL, 1);   /* user space keeps this one */
                send = 1;
            } else {
                scount = 1;
                smapped = len;
            }
        }
        st->s_lo = (u64)ret;
        st->s_hi = (u64)ret + len;
    } else if (nr == NR_MUNMAP) {
        struct live_key_t k = {.pid = pid, .addr = c->a[0]};
        if (v && v->len == len) {
            site = 1;
            exemplar = 0;
            sip = v->ip; sra = v->ra; spath = v->path; sunmapped = len;
            if (!st->held_nursery)
                live.delete(&k);
        } else if (len < MIN_LEN) {
            count(C_FILTERED, 1);
        } else if (overlap) {
            send = 1;
            load_ra(st);
        } else {
            count(C_UNTRACKED, 1);   /* memory never seen mapped, or a hole: nothing to do */
        }
        /* Nothing to clear where the query found no bit at all. */
        if (!queried || overlap) {
            st->c_lo = c->a[0];
            st->c_hi = c->a[0] + len;
        }
    } else if (nr == NR_MREMAP) {
        struct live_key_t k = {.pid = pid, .addr = c->a[0]};
        int exact = exact_hit(v, nr, len, c->a[3]);
        struct live_val_t moved = {.len = nlen, .ip = c->ip, .ra = c->ra, .path = c->path,
                                   .ts = bpf_ktime_get_ns(), .flags = 0, .fd = -1};
        if (exact && v) {
            moved = *v;
            moved.len = nlen;
            live.delete(&k);
        }
        site = 1;
        if (!exact && overlap) {
            send = 1;
        } else {
            /* An exact move of a kernel-held mapping, or a resize of one nobody tracks (it
             * becomes the caller's, as user space would keep it): held here either way. */
            struct live_key_t nk = {.pid = pid, .addr = (u64)ret};
            if (live.update(&nk, &moved) != 0) {
                count(C_FULL, 1);
                send = 1;
            } else {
                sip = moved.ip; sra = moved.ra; spath = moved.path;
                if (nlen > len)
                    smapped = nlen - len;
                else
                    sunmapped = len - nlen;
            }
            if (exact)
                exemplar = 0;   /* the mapping's own site sent its exemplar when it was made */
        }
        if (!(c->a[3] & MREMAP_DONTUNMAP) && (!queried || overlap)) {
            st->c_lo = c->a[0];
            st->c_hi = c->a[0] + len;
        }
        st->s_lo = (u64)ret;
        st->s_hi = (u64)ret + nlen;
    } else if (nr == NR_BRK || nr == NR_SHMAT) {
        send = 1;
        site = 1;
        spath = 0;
    } else {
        send = 1;    /* shmdt, memfd_create */
    }
    if (site && site_add(pid, sip, sra, spath, scount, smapped, sunmapped) && exemplar)
        send_exemplar(pid, c);
    if (send)
        stream(pid, st->tid, c, ret, st->slot_known);
    update_index(ctx, st);
}

/* One probe, at syscall exit: the arguments are still in the saved user registers (only ax
 * changed), so nothing has to be carried over from the entry, which halves the cost. An unmap
 * of a hole is decided here whole; an index update that the decision needs runs next. */
RAW_TRACEPOINT_PROBE(sys_exit) {
    struct pt_regs *regs = (struct pt_regs *)ctx->args[0];
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 pid = pid_tgid >> 32, tid = (u32)pid_tgid;
    u64 nr = 0;
    /* One process: its pid first, then one read of the registers (a kernel read costs the same
     * for 8 bytes or all of them). A tree: the syscall number first, which spares the lookup in
     * `traced` for every other syscall of every process. */
    if (FOLLOW) {
        bpf_probe_read_kernel(&nr, 8, &regs->orig_ax);
        if (kind_index(nr) < 0 || (pid != TARGET && !traced.lookup(&pid)))
            return 0;
    } else if (pid != TARGET) {
        return 0;
    }
    int zero = 0;
    u32 *go = ready.lookup(&zero);
    struct state_t *st = current_state();
    if (!st || !go || !*go)
        return 0;
    struct pt_regs *u = &st->regs;
    bpf_probe_read_kernel(u, sizeof(*u), regs);
    nr = u->orig_ax;
    int kind = kind_index(nr);
    if (kind < 0)
        return 0;
    struct call_t *c = &st->c;
    c->nr = nr;
    c->a[0] = u->di; c->a[1] = u->si; c->a[2] = u->dx; c->a[3] = u->r10; c->a[4] = u->r8;
    c->ip = u->ip; c->sp = u->sp; c->bp = u->bp; c->ra = 0; c->path = 0;
    st->epoch = facts_epoch_now();
    st->slot_known = 0;
    s64 ret = (s64)ctx->args[1];
    st->ret = ret; st->pid = pid; st->tid = tid;
    st->c_lo = st->c_hi = st->s_lo = st->s_hi = 0;
    st->held_nursery = 0;
    count(kind, 1);
    u64 len = page_round(c->a[1]);

    if (STREAM_ALL || nr != NR_MUNMAP)
        load_ra(st);
    if (STREAM_ALL) {
        int send = 0;
        if (nr == NR_MMAP || nr == NR_MREMAP)
            c->path = path_of(st, c->ra, c->cfa);
        if (ret < 0 && nr != NR_BRK)
            count(C_FAILED, 1);
        else if ((nr == NR_MMAP || nr == NR_MUNMAP) && len < MIN_LEN)
            count(C_FILTERED, 1);
        else
            send = 1;
        if (send && (nr == NR_MMAP || nr == NR_MREMAP || nr == NR_BRK || nr == NR_SHMAT)
            && site_add(pid, c->ip, c->ra, c->path, 0, 0, 0))
            send_exemplar(pid, c);
        if (send)
            stream(pid, tid, c, ret, st->slot_known);
        return 0;
    }
    if (ret < 0 && nr != NR_BRK) {
        count(C_FAILED, 1);
        return 0;
    }
    st->gen = gen_of(pid, st->epoch);
    if (nr == NR_MMAP || nr == NR_MREMAP)
        c->path = path_of(st, c->ra, c->cfa);

    /* What the decision needs to know from the index: does the range this call takes away
     * touch tracked memory? Not asked for an exact kernel-ledger hit, nor for a plain mmap. */
    u64 q_lo = 0, q_hi = 0;
    struct live_val_t *v = 0;   /* the kernel ledger's entry at an unmap's address */
    if (nr == NR_MUNMAP && nursery_cancel(st, c->a[0], len)) {
        /* The common end of a young mapping: its exact munmap on the CPU that holds it. */
        st->held_nursery = 1;
        v = &st->held;
    } else if (nr == NR_MUNMAP || nr == NR_MREMAP) {
        struct live_key_t k = {.pid = pid, .addr = c->a[0]};
        v = live.lookup(&k);
        int exact = exact_hit(v, nr, len, c->a[3]);
        if (!exact && !(nr == NR_MUNMAP && len < MIN_LEN)) {
            q_lo = c->a[0];
            q_hi = c->a[0] + len;
        }
    } else if (nr == NR_MMAP && (c->a[3] & MAP_FIXED) && !(c->a[3] & MAP_FIXED_NOREPLACE)) {
        q_lo = (u64)ret;
        q_hi = (u64)ret + len;
    }
    int overlap = 0, queried = 0;
    if (q_hi > q_lo) {
        st->q_lo = q_lo;
        st->q_hi = q_hi;
        v = 0;
        /* A range within one block this CPU knows no `full` bit above covers: the block's node
         * answers (an unmap of a hole beside live mappings, libucm's storm). Else the walk, as
         * for a range that runs into the next root (idx_begin took only its first root's part). */
        int whole = idx_begin(&st->w, st->gen, q_lo, q_hi, 0) == q_hi;
        if (whole && idx_query_block(&st->w, pid, &st->seen) == 0) {
            queried = 1;
        } else {
            steps.call(ctx, STEP_QUERY);
            count(C_STEP_FAILED, 1);   /* not asked: as if it touched tracked memory (streamed) */
            overlap = 1;
        }
    }
    decide(ctx, st, v, overlap, queried);
    return 0;
}

/* The query, when the call takes a range away that is not one exact kernel-ledger entry (a
 * program of its own: the verifier's budget), then the decision. */
int step_query(struct bpf_raw_tracepoint_args *ctx) {
    struct state_t *st = current_state();
    if (!st)
        return 0;
    u64 q_lo = st->q_lo, q_hi = st->q_hi;
    int overlap = 0, queried = 0;
    if (idx_degraded()) {
        overlap = 1;
    } else {
        /* Root by root, up to QUERY_ROOTS of them (2 TiB); a larger range is streamed. */
        for (int part = 0; part < QUERY_ROOTS && q_lo < q_hi; part++) {
            q_lo = idx_begin(&st->w, st->gen, q_lo, q_hi, 0);
            if (idx_query(&st->w, st->pid)) {
                overlap = 1;
                break;
            }
        }
        queried = !overlap && q_lo >= q_hi;
        overlap = overlap || q_lo < q_hi;
        /* Nothing tracked in a block no `full` bit above covers: remembered (idx_query_block). */
        if (queried)
            idx_remember_block(&st->w, st->pid, st->seen);
    }
    /* Tracked memory there may be a young mapping in some CPU's slot: step_nursery. */
    if (overlap && NURSERY) {
        steps.call(ctx, STEP_NURSERY);
        count(C_STEP_FAILED, 1);
    }
    /* An exact entry would not have been asked about: nothing of the kernel ledger's is needed. */
    decide(ctx, st, 0, overlap, queried);
    return 0;
}

/* A call that takes away tracked memory that is not one exact `live` entry: every CPU's slot
 * that holds memory of the range is cancelled (this munmap's exact mapping) or moved to `live`,
 * so that the decision after sees all of it. Then `live` is asked again: a mapping evicted from
 * its slot since the first lookup is there now. */
int step_nursery(struct bpf_raw_tracepoint_args *ctx) {
    struct state_t *st = current_state();
    if (!st)
        return 0;
    u64 lo = st->q_lo, hi = st->q_hi, nr = st->c.nr;
    for (u32 cpu = 0; cpu < NCPUS; cpu++) {
        struct nursery_t *s = nursery.lookup(&cpu);
        if (!s)
            continue;
        u64 a = s->addr;
        if (a < NURSERY_FIRST || s->pid != st->pid)
            continue;
        struct live_val_t v = s->v;
        if (*(volatile u64 *)&s->addr != a || a >= hi || a + v.len <= lo)
            continue;
        if (nr == NR_MUNMAP && a == lo && a + v.len == hi && !st->held_nursery) {
            if (nursery_cas(s, a, NURSERY_CANCELLED) == a) {
                st->held = v;
                st->held_nursery = 1;
            }
            continue;
        }
        struct live_key_t k = {.pid = st->pid, .addr = a};
        if (live.update(&k, &v) != 0) {
            count(C_FULL, 1);   /* it stays in its slot, where user space reads it */
            continue;
        }
        nursery_cas(s, a, NURSERY_EMPTY);
    }
    struct live_val_t *v = &st->held;
    int overlap = 0;
    if (!st->held_nursery) {
        struct live_key_t k = {.pid = st->pid, .addr = lo};
        v = live.lookup(&k);
        if (!exact_hit(v, nr, hi - lo, st->c.a[3])) {
            v = 0;
            overlap = 1;
        }
    }
    decide(ctx, st, v, overlap, 0);
    return 0;
}

/* Clearing the index, then emptying children a clear covered wholly, then setting. */
int step_clear(struct bpf_raw_tracepoint_args *ctx) {
    struct state_t *st = current_state();
    if (!st)
        return 0;
    idx_clear(&st->w, st->pid);
    s32 *zap = st->w.zap_f0;
    if (zap[0] >= 0 || zap[1] >= 0 || zap[2] >= 0 || zap[3] >= 0 || zap[4] >= 0 || zap[5] >= 0) {
        steps.call(ctx, STEP_ZAP);
        count(C_STEP_FAILED, 1);   /* a zap not done leaves bits over-set: safe */
    }
    update_index(ctx, st);
    return 0;
}

int step_zap(struct bpf_raw_tracepoint_args *ctx) {
    struct state_t *st = current_state();
    if (!st)
        return 0;
    idx_zap(&st->w, st->pid);
    update_index(ctx, st);
    return 0;
}

int step_set(struct bpf_raw_tracepoint_args *ctx) {
    struct state_t *st = current_state();
    if (st && idx_set(&st->w, st->pid))   /* else degraded: idx_node said so */
        update_index(ctx, st);             /* the range's next root, if any */
    return 0;
}

static __always_inline void send_proc(u32 pid, u32 kind, u32 child) {
    struct proc_rec_t *r = rare.ringbuf_reserve(sizeof(struct proc_rec_t));
    if (!r) {
        count(C_LOST_PROC, 1);
        return;
    }
    r->type = REC_PROC; r->pid = pid; r->kind = kind; r->child = child; r->ts = bpf_ktime_get_ns();
    rare.ringbuf_submit(r, BPF_RB_NO_WAKEUP);
}

/* The tracepoint's own format, not task_struct: BCC compiles against headers that need not
 * match the running kernel's layout. It fires for new threads too; user space tells them apart
 * (an entry for a thread is harmless: filtering is on the thread group id, and exit removes it). */
TRACEPOINT_PROBE(sched, sched_process_fork) {
    if (!FOLLOW)
        return 0;
    u32 parent = bpf_get_current_pid_tgid() >> 32;
    if (!traced.lookup(&parent))
        return 0;
    u32 child = args->child_pid;
    u8 one = 1;
    traced.update(&child, &one);
    send_proc(parent, PROC_FORK, child);
    return 0;
}

/* A new address space (exec) or none (exit): the range index starts a new generation, whose
 * nodes user space never sees mixed with the old ones (it deletes those later). */
static __always_inline void new_generation(u32 pid) {
    u32 *g = gens.lookup(&pid);
    u32 next = g ? *g + 1 : 1;
    gens.update(&pid, &next);
    int zero = 0;
    u64 *changed = gens_changed.lookup(&zero);
    if (changed)
        __sync_fetch_and_add(changed, 1);   /* after the update: a memo filled before is stale */
}

TRACEPOINT_PROBE(sched, sched_process_exec) {
    u32 pid = bpf_get_current_pid_tgid() >> 32;
    if (pid == TARGET || traced.lookup(&pid)) {
        new_generation(pid);
        send_proc(pid, PROC_EXEC, 0);
    }
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit) {
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 pid = pid_tgid >> 32, tid = (u32)pid_tgid;
    if (!traced.lookup(&tid))
        return 0;
    if (pid == tid) {
        new_generation(pid);
        send_proc(pid, PROC_EXIT, 0);
    }
    if (tid != TARGET)
        traced.delete(&tid);   /* a followed process's leader, or a thread recorded at fork */
    return 0;
}
