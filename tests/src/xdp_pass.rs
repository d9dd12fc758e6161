//! A two-instruction `XDP_PASS` program, loaded with raw bpf(2) calls, for
//! the router's veth toward the gateway.
//!
//! Why not GRO alone: native XDP_TX on the gateway's veth queues frames on
//! the peer's ring, but veth_xdp_flush() wakes the peer's NAPI only if the
//! peer has an XDP program. With GRO-only NAPI the frames wait for unrelated
//! traffic to kick the ring (measured: 200 ms RTT, 100% loss when idle).

use crate::netns::in_netns;
use anyhow::{Context, Result};
use std::ffi::CString;
use std::os::fd::{FromRawFd, OwnedFd};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;
const XDP_PASS: i32 = 2;

#[repr(C)]
struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

/// Leading fields of `union bpf_attr` for BPF_PROG_LOAD; the kernel zero-fills the rest.
#[repr(C)]
#[derive(Default)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

#[repr(C)]
struct LinkCreate {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
}

fn bpf<T>(cmd: libc::c_long, attr: &T) -> std::io::Result<OwnedFd> {
    // SAFETY: `attr` is a valid, initialised bpf_attr prefix of the given size.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *const T, size_of::<T>()) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Attaches `XDP_PASS` in driver mode to `iface` in `ns`. The attachment
/// lasts as long as the returned link.
pub fn attach(ns: &str, iface: &str) -> Result<OwnedFd> {
    let name = CString::new(iface)?;
    in_netns(ns, || -> Result<OwnedFd> {
        let insns = [
            Insn {
                code: 0xb7,
                regs: 0,
                off: 0,
                imm: XDP_PASS,
            }, // r0 = XDP_PASS
            Insn {
                code: 0x95,
                regs: 0,
                off: 0,
                imm: 0,
            }, // exit
        ];
        let license = c"GPL";
        let prog = bpf(
            BPF_PROG_LOAD,
            &ProgLoad {
                prog_type: BPF_PROG_TYPE_XDP,
                insn_cnt: insns.len() as u32,
                insns: insns.as_ptr() as u64,
                license: license.as_ptr() as u64,
                expected_attach_type: BPF_XDP,
                ..Default::default()
            },
        )
        .context("load XDP_PASS program")?;
        // SAFETY: `name` is a NUL-terminated string.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        anyhow::ensure!(ifindex != 0, "no interface {iface} in {ns}");
        let link = LinkCreate {
            prog_fd: std::os::fd::AsRawFd::as_raw_fd(&prog) as u32,
            target_ifindex: ifindex,
            attach_type: BPF_XDP,
            flags: XDP_FLAGS_DRV_MODE,
        };
        bpf(BPF_LINK_CREATE, &link).with_context(|| format!("attach XDP_PASS to {iface} in {ns}"))
    })?
}
