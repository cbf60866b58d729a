/* LD_PRELOAD shim for Debian's linux.uml 6.1 on hosts whose CPUs have large XSAVE areas (AMX,
 * AVX-512): that kernel writes the guest's FPU state back with PTRACE_SETREGSET(NT_X86_XSTATE)
 * using an 832-byte buffer, which the host kernel refuses (EFAULT) unless the buffer has the
 * host's full XSAVE size, and the guest's init dies at once. This shim pads such writes: it reads
 * the full current state, lays UML's bytes over its start, and writes the full size. Newer UML
 * kernels size the buffer themselves; then the shim is a no-op. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <elf.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/types.h>
#include <sys/uio.h>

typedef long (*ptrace_fn)(int, pid_t, void *, void *);

long ptrace(enum __ptrace_request request, ...)
{
    static ptrace_fn real;
    va_list ap;
    va_start(ap, request);
    pid_t pid = va_arg(ap, pid_t);
    void *addr = va_arg(ap, void *);
    void *data = va_arg(ap, void *);
    va_end(ap);
    if (!real)
        real = (ptrace_fn)dlsym(RTLD_NEXT, "ptrace");
    if ((int)request == PTRACE_SETREGSET && (long)addr == NT_X86_XSTATE && data) {
        struct iovec *iov = data;
        size_t cap = 1 << 16;
        char *buf = calloc(1, cap);
        if (buf) {
            struct iovec full = {buf, cap};
            long r = real(PTRACE_GETREGSET, pid, addr, &full);
            if (r == 0 && full.iov_len > iov->iov_len) {
                memcpy(buf, iov->iov_base, iov->iov_len);
                r = real(PTRACE_SETREGSET, pid, addr, &full);
                free(buf);
                return r;
            }
            free(buf);
        }
    }
    return real((int)request, pid, addr, data);
}
