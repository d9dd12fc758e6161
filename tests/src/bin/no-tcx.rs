//! Runs a program as on a kernel without TCX (before 6.6): a seccomp
//! filter answers its `bpf(BPF_LINK_CREATE)` calls with `EINVAL`, what
//! such a kernel answers a TCX link, so the gateway in TC mode falls back
//! to a clsact filter. The filter stays across the program's execs (a
//! reload's new image). Other links (XDP's) fail too: for TC mode only.
//!
//! usage: no-tcx PROGRAM [ARGS...]

use std::{os::unix::process::CommandExt as _, process::Command};

use anyhow::{Context as _, Result, bail};

/// `bpf(2)` command `BPF_LINK_CREATE`.
const BPF_LINK_CREATE: u32 = 28;
#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xc000_003e;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xc000_00b7;
/// Offsets in `struct seccomp_data`: syscall number, architecture, the
/// low half of the first argument (little-endian).
const NR: u32 = 0;
const ARCH: u32 = 4;
const ARG0: u32 = 16;

fn stmt(code: u32, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump_eq(k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter {
        code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
        jt,
        jf,
        k,
    }
}

fn main() -> Result<()> {
    let mut args = std::env::args_os().skip(1);
    let program = args.next().context("usage: no-tcx PROGRAM [ARGS...]")?;
    let load = libc::BPF_LD | libc::BPF_W | libc::BPF_ABS;
    let ret = libc::BPF_RET | libc::BPF_K;
    let allow = stmt(ret, libc::SECCOMP_RET_ALLOW);
    let mut filter = [
        stmt(load, ARCH),
        jump_eq(AUDIT_ARCH, 1, 0),
        allow,
        stmt(load, NR),
        jump_eq(libc::SYS_bpf as u32, 0, 2),
        stmt(load, ARG0),
        jump_eq(BPF_LINK_CREATE, 1, 0),
        allow,
        stmt(ret, libc::SECCOMP_RET_ERRNO | libc::EINVAL as u32),
    ];
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_mut_ptr(),
    };
    // SAFETY: prctl(2) with the documented arguments; `prog` outlives the
    // call, which copies the filter.
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
            || libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &raw const prog,
            ) != 0
        {
            bail!(
                "cannot install the seccomp filter: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    let e = Command::new(&program).args(args).exec();
    bail!("cannot run {}: {e}", program.to_string_lossy())
}
