//! CPU-affine packet steering for the udp data path.
//!
//! Worker `q` is pinned to CPU `q`; the TUN picks its queue, and the SO_REUSEPORT group its
//! socket, by the CPU the packet is processed on. A packet produced on a CPU then wakes the
//! worker on that same CPU (a context switch) instead of a worker elsewhere (an inter-processor
//! interrupt, and on a VM often the exit of a halted vCPU), which is most of the latency of a
//! user-space hop. Every step is optional: if the kernel refuses one, steering is skipped.
//!
//! Opt-in (`FLANNEL_UDP_CPU_STEERING=1`): on the 2-core test-bed it cut ping RTT by about a
//! quarter but also cut single-stream throughput by a fifth, because a flow's sender, its TCP
//! stack and its worker then share one core instead of pipelining across two.

use std::io;
use std::mem::size_of;
use std::os::fd::RawFd;

/// `_IOR('T', 224, int)`: attach a steering eBPF program to a multi-queue TUN.
const TUNSETSTEERINGEBPF: libc::c_ulong = 0x8004_54e0;
/// `SO_ATTACH_REUSEPORT_CBPF`.
const SO_ATTACH_REUSEPORT_CBPF: libc::c_int = 51;
/// `BPF_PROG_LOAD` command of bpf(2).
const BPF_PROG_LOAD: libc::c_long = 5;
/// `BPF_PROG_TYPE_SOCKET_FILTER`.
const BPF_PROG_TYPE_SOCKET_FILTER: u32 = 1;
/// `BPF_FUNC_get_smp_processor_id`.
const BPF_FUNC_GET_SMP_PROCESSOR_ID: i32 = 8;

/// The CPUs this process may run on, if they are exactly `0..n` (the layout steering needs).
pub fn contiguous_cpus() -> Option<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: set is valid for writes of its size.
    let r = unsafe { libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set) };
    if r != 0 {
        return None;
    }
    let mut n = 0;
    // SAFETY: CPU_ISSET reads the set filled above.
    while n < libc::CPU_SETSIZE as usize && unsafe { libc::CPU_ISSET(n, &set) } {
        n += 1;
    }
    // Any CPU set beyond the first gap means the set is not 0..n.
    // SAFETY: as above.
    let more = (n..libc::CPU_SETSIZE as usize).any(|c| unsafe { libc::CPU_ISSET(c, &set) });
    (n > 0 && !more).then_some(n)
}

/// Pins the calling thread to one CPU.
pub fn pin_current_thread(cpu: usize) -> io::Result<()> {
    // SAFETY: plain data, filled by CPU_SET, passed by pointer for the call.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

#[repr(C)]
struct BpfInsn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

#[repr(C)]
#[derive(Default)]
struct BpfProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
}

/// Makes the TUN choose the queue numbered like the current CPU (eBPF: `return cpu id`).
pub fn steer_tun_by_cpu(tun_fd: RawFd) -> io::Result<()> {
    let insns = [
        // r0 = bpf_get_smp_processor_id()
        BpfInsn {
            code: 0x85,
            regs: 0,
            off: 0,
            imm: BPF_FUNC_GET_SMP_PROCESSOR_ID,
        },
        // exit (returns r0: the queue index, modulo the number of queues)
        BpfInsn {
            code: 0x95,
            regs: 0,
            off: 0,
            imm: 0,
        },
    ];
    let license = b"GPL\0";
    let attr = BpfProgLoadAttr {
        prog_type: BPF_PROG_TYPE_SOCKET_FILTER,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        ..Default::default()
    };
    // SAFETY: attr and the buffers it points to live across the call; size matches.
    let prog = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            &attr as *const BpfProgLoadAttr,
            size_of::<BpfProgLoadAttr>(),
        )
    };
    if prog < 0 {
        return Err(io::Error::last_os_error());
    }
    let prog = prog as libc::c_int;
    // SAFETY: prog is a valid int for the ioctl; the TUN keeps its own reference to it.
    let r = unsafe { libc::ioctl(tun_fd, TUNSETSTEERINGEBPF as _, &prog as *const libc::c_int) };
    let err = io::Error::last_os_error();
    // SAFETY: prog is our fd; the TUN holds the program after the ioctl.
    unsafe {
        libc::close(prog);
    }
    if r < 0 {
        return Err(err);
    }
    Ok(())
}

#[repr(C)]
struct SockFilter {
    code: u16,
    jt: u8,
    jf: u8,
    k: u32,
}

#[repr(C)]
struct SockFprog {
    len: u16,
    filter: *const SockFilter,
}

/// Makes the SO_REUSEPORT group deliver to the socket bound `cpu`-th (classic BPF: `ld #cpu;
/// ret a`). Sockets must have been bound in worker order.
pub fn steer_reuseport_by_cpu(sock_fd: RawFd) -> io::Result<()> {
    let prog = [
        // A = current CPU (SKF_AD_OFF + SKF_AD_CPU)
        SockFilter {
            code: 0x20,
            jt: 0,
            jf: 0,
            k: 0xffff_f000 + 36,
        },
        // return A
        SockFilter {
            code: 0x16,
            jt: 0,
            jf: 0,
            k: 0,
        },
    ];
    let fprog = SockFprog {
        len: prog.len() as u16,
        filter: prog.as_ptr(),
    };
    // SAFETY: fprog and the filter it points to live across the call.
    let r = unsafe {
        libc::setsockopt(
            sock_fd,
            libc::SOL_SOCKET,
            SO_ATTACH_REUSEPORT_CBPF,
            &fprog as *const SockFprog as *const libc::c_void,
            size_of::<SockFprog>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
