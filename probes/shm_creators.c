/*
 * shm_creators.c - BCC program: who creates shared-memory objects, on the whole host.
 *
 * A process that holds shared memory is rarely the one that made it: a DataLoader worker creates
 * /dev/shm/torch_* and fills it, the main process maps it and keeps it. The holder's mmaps say
 * who keeps the memory; this program says who made it. One program on the raw sys_exit
 * tracepoint (the arguments are still in the saved user registers, as in mmap_ledger.c) looks at
 * five syscalls only and lets every other one go at the first compare:
 *
 *   openat/open with O_CREAT of a path under /dev/shm/   (shm_open, torch, multiprocessing)
 *   memfd_create                                          (memfd:NAME)
 *   shmget with IPC_CREAT                                 (SysV: the shmid is the mapping's inode)
 *   ftruncate / fallocate of a descriptor one of those returned (the object's size)
 *   close of such a descriptor                            (forgets it)
 *
 * A creation is sent with the user registers and STACK_BYTES of the stack for DWARF unwinding in
 * user space (glibc has no frame pointers: the kernel's own stack walk stops in libc). The rate is
 * that of object creation (a few thousand a second at most), so a perf buffer and a callback do.
 *
 * Arguments (-D): SC_OPEN, SC_OPENAT, SC_MEMFD_CREATE, SC_SHMGET, SC_FTRUNCATE, SC_FALLOCATE,
 * SC_CLOSE, O_CREAT_FLAG, IPC_CREAT_FLAG, NAME_BYTES, STACK_BYTES, KIND_* and EV_*: supplied by
 * leakhunt.trace.creators.cflags().
 */
#include <uapi/linux/ptrace.h>
#include <linux/sched.h>

struct event_t {
    u32 type;        /* EV_CREATE, EV_SIZE */
    u32 kind;        /* KIND_FILE, KIND_MEMFD, KIND_SYSV */
    u32 pid; u32 tid;
    u64 ts;
    s64 ret;         /* the fd, or the shmid */
    u64 size;        /* shmget's size, ftruncate's length, fallocate's end */
    u64 ip; u64 sp; u64 bp;
    char comm[16];
    char name[NAME_BYTES];
    u32 nbytes; u32 pad;
    u8 stack[STACK_BYTES];
};
struct fd_key_t { u32 pid; s32 fd; };

BPF_PERCPU_ARRAY(scratch, struct event_t, 1);
BPF_TABLE("lru_hash", struct fd_key_t, u32, created, 65536);
BPF_PERF_OUTPUT(events);

static __always_inline int is_dev_shm(const char *s) {
    return s[0] == '/' && s[1] == 'd' && s[2] == 'e' && s[3] == 'v' && s[4] == '/' && s[5] == 's' &&
           s[6] == 'h' && s[7] == 'm' && s[8] == '/';
}

RAW_TRACEPOINT_PROBE(sys_exit) {
    struct pt_regs *regs = (struct pt_regs *)ctx->args[0];
    u64 nr = 0;
    bpf_probe_read_kernel(&nr, 8, &regs->orig_ax);
    if (nr != SC_OPENAT && nr != SC_OPEN && nr != SC_MEMFD_CREATE && nr != SC_SHMGET &&
        nr != SC_FTRUNCATE && nr != SC_FALLOCATE && nr != SC_CLOSE)
        return 0;
    s64 ret = (s64)ctx->args[1];
    if (ret < 0)
        return 0;
    u64 di = 0, si = 0, dx = 0, r10 = 0;
    bpf_probe_read_kernel(&di, 8, &regs->di);
    bpf_probe_read_kernel(&si, 8, &regs->si);
    bpf_probe_read_kernel(&dx, 8, &regs->dx);
    bpf_probe_read_kernel(&r10, 8, &regs->r10);
    u64 pid_tgid = bpf_get_current_pid_tgid();
    struct fd_key_t key = {pid_tgid >> 32, 0};
    if (nr == SC_CLOSE) {
        key.fd = (s32)di;
        created.delete(&key);
        return 0;
    }
    int zero = 0;
    struct event_t *e = scratch.lookup(&zero);
    if (!e)
        return 0;
    e->pid = pid_tgid >> 32;
    e->tid = (u32)pid_tgid;
    e->ts = bpf_ktime_get_ns();
    e->ret = ret;
    e->size = 0;
    e->nbytes = 0;
    if (nr == SC_FTRUNCATE || nr == SC_FALLOCATE) {
        key.fd = (s32)di;
        u32 *kind = created.lookup(&key);
        if (!kind)
            return 0;
        e->type = EV_SIZE;
        e->kind = *kind;
        e->ret = (s64)di;
        e->size = nr == SC_FTRUNCATE ? si : dx + r10;
        events.perf_submit(ctx, e, offsetof(struct event_t, stack));
        return 0;
    }
    const char *path = 0;
    if (nr == SC_OPENAT) {
        if (!(dx & O_CREAT_FLAG))
            return 0;
        path = (const char *)si;
        e->kind = KIND_FILE;
    } else if (nr == SC_OPEN) {
        if (!(si & O_CREAT_FLAG))
            return 0;
        path = (const char *)di;
        e->kind = KIND_FILE;
    } else if (nr == SC_MEMFD_CREATE) {
        path = (const char *)di;
        e->kind = KIND_MEMFD;
    } else {
        if (!(dx & IPC_CREAT_FLAG))
            return 0;
        e->kind = KIND_SYSV;
        e->size = si;
    }
    e->name[0] = 0;
    if (path) {
        if (bpf_probe_read_user_str(e->name, NAME_BYTES, path) <= 0)
            return 0;
        if (e->kind == KIND_FILE && !is_dev_shm(e->name))
            return 0;
    }
    e->type = EV_CREATE;
    bpf_get_current_comm(&e->comm, sizeof(e->comm));
    struct pt_regs u = {};
    bpf_probe_read_kernel(&u, sizeof(u), regs);
    e->ip = u.ip; e->sp = u.sp; e->bp = u.bp;
    if (bpf_probe_read_user(e->stack, STACK_BYTES, (void *)u.sp) == 0)
        e->nbytes = STACK_BYTES;
    else if (bpf_probe_read_user(e->stack, STACK_BYTES / 4, (void *)u.sp) == 0)
        e->nbytes = STACK_BYTES / 4;
    if (e->kind != KIND_SYSV) {
        key.fd = (s32)ret;
        u32 kind = e->kind;
        created.update(&key, &kind);
    }
    events.perf_submit(ctx, e, sizeof(*e));
    return 0;
}
