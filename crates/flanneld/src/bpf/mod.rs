//! Just enough eBPF to let the kernel do a backend's encapsulation: an instruction builder and
//! program loading (`BPF_PROG_LOAD`, with the verifier's log in the error) over the raw
//! `bpf(2)` system call; programs are attached as tc filters (`crate::netlink::tc`). The programs are a few dozen
//! instructions each, assembled at run time with the host's addresses as constants, so no
//! compiler, object file or bpffs is needed.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// A BPF failure, with what was being done.
#[derive(Debug, thiserror::Error)]
#[error("{context}: {source}{}", if log.is_empty() { String::new() } else { format!("\nverifier log:\n{log}") })]
pub struct BpfError {
    /// What failed.
    pub context: String,
    /// The system call's error.
    pub source: std::io::Error,
    /// The verifier's log (program loads).
    pub log: String,
}

/// One BPF instruction (`struct bpf_insn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

/// Registers: r0 return value, r1-r5 arguments, r6-r9 callee-saved, r10 frame pointer.
pub type Reg = u8;
/// The frame pointer (read-only).
pub const FP: Reg = 10;

const ALU64: u8 = 0x07;
const ALU: u8 = 0x04;
const JMP: u8 = 0x05;
const JMP32: u8 = 0x06;
const LDX: u8 = 0x01;
const ST: u8 = 0x02;
const STX: u8 = 0x03;
const MEM: u8 = 0x60;
const K: u8 = 0x00;
const X: u8 = 0x08;

/// Access sizes.
#[derive(Debug, Clone, Copy)]
pub enum Size {
    /// 1 byte.
    B = 0x10,
    /// 2 bytes.
    H = 0x08,
    /// 4 bytes.
    W = 0x00,
}

/// Conditional jumps (against an immediate).
#[derive(Debug, Clone, Copy)]
pub enum Cond {
    /// ==
    Eq = 0x10,
    /// !=
    Ne = 0x50,
}

fn insn(code: u8, dst: Reg, src: Reg, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: (src << 4) | (dst & 0x0f),
        off,
        imm,
    }
}

/// Builds a program; jumps name labels that are resolved by [`Asm::finish`].
#[derive(Debug, Default)]
pub struct Asm {
    insns: Vec<Insn>,
    labels: std::collections::HashMap<&'static str, usize>,
    fixups: Vec<(usize, &'static str)>,
}

impl Asm {
    /// An empty program.
    pub fn new() -> Self {
        Self::default()
    }
    /// dst = imm (64-bit, sign-extended).
    pub fn mov_imm(&mut self, dst: Reg, imm: i32) -> &mut Self {
        self.insns.push(insn(ALU64 | 0xb0 | K, dst, 0, 0, imm));
        self
    }
    /// dst = src.
    pub fn mov(&mut self, dst: Reg, src: Reg) -> &mut Self {
        self.insns.push(insn(ALU64 | 0xb0 | X, dst, src, 0, 0));
        self
    }
    /// dst += imm.
    pub fn add_imm(&mut self, dst: Reg, imm: i32) -> &mut Self {
        self.insns.push(insn(ALU64 | K, dst, 0, 0, imm));
        self
    }
    /// dst &= imm.
    pub fn and_imm(&mut self, dst: Reg, imm: i32) -> &mut Self {
        self.insns.push(insn(ALU64 | 0x50 | K, dst, 0, 0, imm));
        self
    }
    /// dst = htobe16(dst) (also clears the upper bits).
    pub fn be16(&mut self, dst: Reg) -> &mut Self {
        self.insns.push(insn(ALU | 0xd0 | X, dst, 0, 0, 16));
        self
    }
    /// dst = *(size *)(src + off).
    pub fn load(&mut self, size: Size, dst: Reg, src: Reg, off: i16) -> &mut Self {
        self.insns
            .push(insn(LDX | MEM | size as u8, dst, src, off, 0));
        self
    }
    /// *(size *)(dst + off) = imm.
    pub fn store_imm(&mut self, size: Size, dst: Reg, off: i16, imm: i32) -> &mut Self {
        self.insns
            .push(insn(ST | MEM | size as u8, dst, 0, off, imm));
        self
    }
    /// *(size *)(dst + off) = src.
    pub fn store(&mut self, size: Size, dst: Reg, off: i16, src: Reg) -> &mut Self {
        self.insns
            .push(insn(STX | MEM | size as u8, dst, src, off, 0));
        self
    }
    /// if (dst cond imm) goto label (64-bit compare).
    pub fn jump_if(&mut self, cond: Cond, dst: Reg, imm: i32, label: &'static str) -> &mut Self {
        self.fixups.push((self.insns.len(), label));
        self.insns.push(insn(JMP | cond as u8 | K, dst, 0, 0, imm));
        self
    }
    /// if ((u32)dst cond (u32)imm) goto label.
    pub fn jump32_if(&mut self, cond: Cond, dst: Reg, imm: u32, label: &'static str) -> &mut Self {
        self.fixups.push((self.insns.len(), label));
        self.insns
            .push(insn(JMP32 | cond as u8 | K, dst, 0, 0, imm as i32));
        self
    }
    /// dst >>= imm (logical).
    pub fn rsh_imm(&mut self, dst: Reg, imm: i32) -> &mut Self {
        self.insns.push(insn(ALU64 | 0x70 | K, dst, 0, 0, imm));
        self
    }
    /// dst += src.
    pub fn add(&mut self, dst: Reg, src: Reg) -> &mut Self {
        self.insns.push(insn(ALU64 | X, dst, src, 0, 0));
        self
    }
    /// dst ^= imm.
    pub fn xor_imm(&mut self, dst: Reg, imm: i32) -> &mut Self {
        self.insns.push(insn(ALU64 | 0xa0 | K, dst, 0, 0, imm));
        self
    }
    /// Copies `len` packet bytes from `offset` to the stack at `fp + at`
    /// (`bpf_skb_load_bytes`, the context in `ctx`); jumps to `fail` if the packet is shorter.
    pub fn skb_load_bytes(
        &mut self,
        ctx: Reg,
        offset: i32,
        at: i32,
        len: i32,
        fail: &'static str,
    ) -> &mut Self {
        self.skb_bytes_args(ctx, offset, at, len)
            .call(helper::SKB_LOAD_BYTES)
            .jump_if(Cond::Ne, 0, 0, fail)
    }
    /// Writes `len` bytes from the stack at `fp + at` into the packet at `offset`
    /// (`bpf_skb_store_bytes`); jumps to `fail` on error.
    pub fn skb_store_bytes(
        &mut self,
        ctx: Reg,
        offset: i32,
        at: i32,
        len: i32,
        fail: &'static str,
    ) -> &mut Self {
        self.skb_bytes_args(ctx, offset, at, len)
            .mov_imm(5, 0)
            .call(helper::SKB_STORE_BYTES)
            .jump_if(Cond::Ne, 0, 0, fail)
    }
    /// r1..r4 = ctx, offset, fp + at, len: the arguments both byte helpers start with.
    fn skb_bytes_args(&mut self, ctx: Reg, offset: i32, at: i32, len: i32) -> &mut Self {
        self.mov(1, ctx)
            .mov_imm(2, offset)
            .mov(3, FP)
            .add_imm(3, at)
            .mov_imm(4, len)
    }
    /// Calls helper number `id`.
    pub fn call(&mut self, id: i32) -> &mut Self {
        self.insns.push(insn(JMP | 0x80, 0, 0, 0, id));
        self
    }
    /// Returns r0.
    pub fn exit(&mut self) -> &mut Self {
        self.insns.push(insn(JMP | 0x90, 0, 0, 0, 0));
        self
    }
    /// Marks the next instruction as `label`.
    pub fn label(&mut self, label: &'static str) -> &mut Self {
        self.labels.insert(label, self.insns.len());
        self
    }
    /// The finished instructions (panics on an undefined label: a bug in the program text).
    pub fn finish(mut self) -> Vec<Insn> {
        for (at, label) in std::mem::take(&mut self.fixups) {
            let target = self.labels[label];
            self.insns[at].off = (target as isize - at as isize - 1) as i16;
        }
        self.insns
    }
}

/// Helper function numbers (`enum bpf_func_id`).
pub mod helper {
    /// `bpf_skb_load_bytes`.
    pub const SKB_LOAD_BYTES: i32 = 26;
    /// `bpf_skb_adjust_room`.
    pub const SKB_ADJUST_ROOM: i32 = 50;
    /// `bpf_skb_store_bytes`.
    pub const SKB_STORE_BYTES: i32 = 9;
    /// `bpf_l3_csum_replace`.
    pub const L3_CSUM_REPLACE: i32 = 10;
    /// `bpf_csum_diff`.
    pub const CSUM_DIFF: i32 = 28;
    /// `bpf_redirect_neigh`.
    pub const REDIRECT_NEIGH: i32 = 152;
}

/// Program types (`enum bpf_prog_type`).
#[derive(Debug, Clone, Copy)]
pub enum ProgType {
    /// tc classifier (`BPF_PROG_TYPE_SCHED_CLS`).
    SchedCls = 3,
}

fn sys_bpf(cmd: i64, attr: &mut [u8]) -> std::io::Result<i64> {
    // SAFETY: attr is a writable buffer of the size passed; the kernel reads/writes within it.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn put_u32(a: &mut [u8], off: usize, v: u32) {
    a[off..off + 4].copy_from_slice(&v.to_ne_bytes());
}

fn put_u64(a: &mut [u8], off: usize, v: u64) {
    a[off..off + 8].copy_from_slice(&v.to_ne_bytes());
}

/// A loaded program; the kernel keeps it while this fd or an attachment (a tc filter) holds
/// it.
#[derive(Debug)]
pub struct Program {
    fd: OwnedFd,
}

impl Program {
    /// Loads `insns` as a `prog_type` program named `name` (at most 15 characters).
    pub fn load(prog_type: ProgType, name: &str, insns: &[Insn]) -> Result<Program, BpfError> {
        const LICENSE: &[u8] = b"Dual MIT/GPL\0";
        let mut log = vec![0u8; 64 * 1024];
        let mut attr = [0u8; 128];
        put_u32(&mut attr, 0, prog_type as u32);
        put_u32(&mut attr, 4, insns.len() as u32);
        put_u64(&mut attr, 8, insns.as_ptr() as u64);
        put_u64(&mut attr, 16, LICENSE.as_ptr() as u64);
        put_u32(&mut attr, 24, 1); // log_level
        put_u32(&mut attr, 28, log.len() as u32);
        put_u64(&mut attr, 32, log.as_mut_ptr() as u64);
        let n = name.len().min(15);
        attr[48..48 + n].copy_from_slice(&name.as_bytes()[..n]);
        match sys_bpf(5 /* BPF_PROG_LOAD */, &mut attr) {
            // SAFETY: the kernel returned a new file descriptor that we now own.
            Ok(fd) => Ok(Program {
                fd: unsafe { OwnedFd::from_raw_fd(fd as i32) },
            }),
            Err(source) => {
                let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
                Err(BpfError {
                    context: format!("failed to load BPF program {name}"),
                    source,
                    log: String::from_utf8_lossy(&log[..end]).trim_end().to_string(),
                })
            }
        }
    }

    /// The program's file descriptor (for attaching).
    pub fn raw_fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(i: &Insn) -> [u8; 8] {
        let mut b = [0u8; 8];
        b[0] = i.code;
        b[1] = i.regs;
        b[2..4].copy_from_slice(&i.off.to_le_bytes());
        b[4..8].copy_from_slice(&i.imm.to_le_bytes());
        b
    }

    #[test]
    fn encodings_match_the_kernel_abi() {
        let mut a = Asm::new();
        a.mov(6, 1) // bf 16
            .load(Size::W, 2, 6, 0) // 61 62 0000
            .be16(3) // dc 03 .. 10000000
            .store_imm(Size::H, FP, -26, 0x40) // 6a 0a e6ff 40000000
            .jump32_if(Cond::Ne, 2, 0xdeadbeef, "out") // 56 02 0100 efbeadde
            .call(helper::REDIRECT_NEIGH) // 85 00 0000 98000000
            .label("out")
            .exit(); // 95
        let p = a.finish();
        assert_eq!(bytes(&p[0]), [0xbf, 0x16, 0, 0, 0, 0, 0, 0]);
        assert_eq!(bytes(&p[1]), [0x61, 0x62, 0, 0, 0, 0, 0, 0]);
        assert_eq!(bytes(&p[2]), [0xdc, 0x03, 0, 0, 16, 0, 0, 0]);
        assert_eq!(bytes(&p[3]), [0x6a, 0x0a, 0xe6, 0xff, 0x40, 0, 0, 0]);
        assert_eq!(bytes(&p[4]), [0x56, 0x02, 1, 0, 0xef, 0xbe, 0xad, 0xde]);
        assert_eq!(bytes(&p[5]), [0x85, 0, 0, 0, 152, 0, 0, 0]);
        assert_eq!(bytes(&p[6]), [0x95, 0, 0, 0, 0, 0, 0, 0]);
    }
}
