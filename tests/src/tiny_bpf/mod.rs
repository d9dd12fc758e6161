//! Tiny BPF programs in raw bytecode, loaded and attached with bpf(2), for
//! the lab's plumbing: the router's `XDP_PASS`, and the benchmark's
//! traffic generator, sink, MAC-swap floor (alone and with one hash map
//! lookup), kernel-speed IP-in-IP client and XDP forwarder (`programs`).
//! No ELF objects and no second BPF toolchain needed.
//!
//! Why the router's veth toward the gateway needs `XDP_PASS` (GRO alone is
//! not enough): native XDP_TX on the gateway's veth queues frames on the
//! peer's ring, but veth_xdp_flush() wakes the peer's NAPI only if the peer
//! has an XDP program. With GRO-only NAPI the frames wait for unrelated
//! traffic to kick the ring (measured: 200 ms RTT, 100% loss when idle).

pub mod asm;
pub mod programs;

use crate::netns::in_netns;
use anyhow::{Context, Result};
use asm::Insn;
use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::Duration;

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_MAP_TYPE_HASH: u32 = 1;
const BPF_MAP_TYPE_PROG_ARRAY: u32 = 3;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;
const BPF_TCX_EGRESS: u32 = 47;
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;
const BPF_F_TEST_XDP_LIVE_FRAMES: u32 = 1 << 1;
const VERIFIER_LOG_SIZE: usize = 1 << 16;

/// Where a program runs.
#[derive(Clone, Copy)]
pub enum Hook {
    /// Native (driver-mode) XDP on a veth.
    Xdp,
    /// tcx egress (clsact's successor), ahead of the device's transmit.
    TcxEgress,
}

/// Leading fields of `union bpf_attr` for BPF_MAP_CREATE.
#[repr(C)]
#[derive(Default)]
struct MapCreate {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

/// `union bpf_attr` for BPF_MAP_UPDATE_ELEM.
#[repr(C)]
struct MapUpdate {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
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

#[repr(C)]
struct LinkUpdate {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// `union bpf_attr` for BPF_PROG_TEST_RUN.
#[repr(C)]
#[derive(Default)]
struct TestRun {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    /// Explicit, so it is zero: the kernel rejects non-zero bytes past the
    /// fields it knows.
    _pad: u32,
}

/// bpf(2); `attr` is a `union bpf_attr` prefix the kernel may write back into.
fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<i32> {
    // SAFETY: `attr` is a valid, initialised bpf_attr prefix of the given
    // size, and every pointer inside it points to live memory of the size
    // given next to it.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, size_of::<T>()) };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(ret as i32)
}

fn new_fd(fd: i32) -> OwnedFd {
    // SAFETY: the kernel returned a new file descriptor that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn create_map(
    map_type: u32,
    key_size: usize,
    value_size: usize,
    max_entries: u32,
) -> Result<OwnedFd> {
    let mut attr = MapCreate {
        map_type,
        key_size: key_size as u32,
        value_size: value_size as u32,
        max_entries,
        ..Default::default()
    };
    let fd = bpf(BPF_MAP_CREATE, &mut attr).context("BPF_MAP_CREATE")?;
    Ok(new_fd(fd))
}

/// Sets `key` to `value` in map `fd`; the caller checks their sizes.
fn update_elem(fd: &OwnedFd, key: &[u8], value: &[u8]) -> Result<()> {
    let mut attr = MapUpdate {
        map_fd: fd.as_raw_fd() as u32,
        _pad: 0,
        key: key.as_ptr() as u64,
        value: value.as_ptr() as u64,
        flags: 0,
    };
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr).context("BPF_MAP_UPDATE_ELEM")?;
    Ok(())
}

/// A BPF hash map for programs to look keys up in (`Asm::load_map`).
pub struct HashMap {
    fd: OwnedFd,
    key_size: usize,
    value_size: usize,
}

impl HashMap {
    pub fn new(key_size: usize, value_size: usize, max_entries: u32) -> Result<Self> {
        Ok(Self {
            fd: create_map(BPF_MAP_TYPE_HASH, key_size, value_size, max_entries)?,
            key_size,
            value_size,
        })
    }

    pub fn insert(&self, key: &[u8], value: &[u8]) -> Result<()> {
        anyhow::ensure!(
            key.len() == self.key_size && value.len() == self.value_size,
            "a {}-byte key and {}-byte value for a map of {} and {}",
            key.len(),
            value.len(),
            self.key_size,
            self.value_size
        );
        update_elem(&self.fd, key, value)
    }

    /// For `Asm::load_map`; the kernel takes its own reference at load.
    pub fn fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }
}

/// A one-slot BPF program array: the program a tail call in another
/// program goes on to.
pub struct ProgArray(OwnedFd);

impl ProgArray {
    pub fn new() -> Result<Self> {
        Ok(Self(create_map(BPF_MAP_TYPE_PROG_ARRAY, 4, 4, 1)?))
    }

    /// Makes `prog` the program tail calls go to. It must be of the type
    /// (and XDP frags support) of the programs that call it.
    pub fn set(&self, prog: BorrowedFd) -> Result<()> {
        let fd = prog.as_raw_fd() as u32;
        update_elem(&self.0, &0u32.to_ne_bytes(), &fd.to_ne_bytes())
            .context("put a program in a program array")
    }

    /// For `Asm::load_map`; the kernel takes its own reference at load.
    pub fn fd(&self) -> i32 {
        self.0.as_raw_fd()
    }
}

pub struct TestRunResult {
    /// The kernel's timing of a run (the mean, over repeats).
    pub duration: Duration,
    /// The program's return value.
    pub verdict: u32,
    /// Length of the frame the program left.
    pub len: usize,
}

/// A loaded program; attachments hold their own reference to it.
pub struct Program {
    fd: OwnedFd,
    hook: Hook,
}

impl Program {
    pub fn load(hook: Hook, insns: &[Insn]) -> Result<Self> {
        let (prog_type, expected_attach_type) = match hook {
            Hook::Xdp => (BPF_PROG_TYPE_XDP, BPF_XDP),
            Hook::TcxEgress => (BPF_PROG_TYPE_SCHED_CLS, BPF_TCX_EGRESS),
        };
        let license = c"GPL";
        let mut log = vec![0u8; VERIFIER_LOG_SIZE];
        let mut attr = ProgLoad {
            prog_type,
            insn_cnt: insns.len() as u32,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            log_level: 1,
            log_size: log.len() as u32,
            log_buf: log.as_mut_ptr() as u64,
            expected_attach_type,
            ..Default::default()
        };
        let fd = bpf(BPF_PROG_LOAD, &mut attr).with_context(|| {
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            format!("verifier:\n{}", String::from_utf8_lossy(&log[..end]))
        })?;
        Ok(Self {
            fd: new_fd(fd),
            hook,
        })
    }

    /// Attaches to `iface` in `ns` for as long as the returned link lives.
    pub fn attach(&self, ns: &str, iface: &str) -> Result<OwnedFd> {
        let (attach_type, flags) = match self.hook {
            Hook::Xdp => (BPF_XDP, XDP_FLAGS_DRV_MODE),
            Hook::TcxEgress => (BPF_TCX_EGRESS, 0),
        };
        in_netns(ns, || {
            let mut link = LinkCreate {
                prog_fd: self.fd.as_raw_fd() as u32,
                target_ifindex: ifindex(iface)?,
                attach_type,
                flags,
            };
            let fd = bpf(BPF_LINK_CREATE, &mut link)
                .with_context(|| format!("attach to {iface} in {ns}"))?;
            Ok(new_fd(fd))
        })?
    }

    /// Puts this program in place of the one `link` runs, in one step:
    /// the interface is never without a program.
    pub fn replace(&self, link: BorrowedFd) -> Result<()> {
        let mut update = LinkUpdate {
            link_fd: link.as_raw_fd() as u32,
            new_prog_fd: self.fd.as_raw_fd() as u32,
            flags: 0,
            old_prog_fd: 0,
        };
        bpf(BPF_LINK_UPDATE, &mut update).context("replace a link's program")?;
        Ok(())
    }

    /// One BPF_PROG_TEST_RUN of `frame`; `out` receives the frame as left.
    pub fn test_run(&self, frame: &[u8], out: &mut [u8]) -> Result<TestRunResult> {
        self.test_run_repeated(frame, &[], 1, out)
    }

    /// BPF_PROG_TEST_RUN of `frame` with context `ctx` (none if empty),
    /// the program run `repeat` times over the same packet; `out` receives
    /// the frame as the last run left it.
    pub fn test_run_repeated(
        &self,
        frame: &[u8],
        ctx: &[u8],
        repeat: u32,
        out: &mut [u8],
    ) -> Result<TestRunResult> {
        let mut attr = TestRun {
            prog_fd: self.fd.as_raw_fd() as u32,
            data_size_in: frame.len() as u32,
            data_size_out: out.len() as u32,
            data_in: frame.as_ptr() as u64,
            data_out: out.as_mut_ptr() as u64,
            repeat,
            ctx_size_in: ctx.len() as u32,
            ctx_in: if ctx.is_empty() {
                0
            } else {
                ctx.as_ptr() as u64
            },
            ..Default::default()
        };
        bpf(BPF_PROG_TEST_RUN, &mut attr).context("BPF_PROG_TEST_RUN")?;
        Ok(TestRunResult {
            duration: Duration::from_nanos(attr.duration.into()),
            verdict: attr.retval,
            len: attr.data_size_out as usize,
        })
    }

    /// For [`ProgArray::set`].
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Runs the program `repeat` times on copies of `frame` as if received
    /// on `ifindex` (of the calling thread's namespace) and carries out its
    /// verdicts: `XDP_TX` transmits out of that interface.
    pub fn run_live(&self, ifindex: u32, frame: &[u8], repeat: u32) -> std::io::Result<()> {
        let ctx = xdp_md(frame, ifindex);
        let mut attr = TestRun {
            prog_fd: self.fd.as_raw_fd() as u32,
            data_size_in: frame.len() as u32,
            data_in: frame.as_ptr() as u64,
            repeat,
            ctx_size_in: ctx.len() as u32,
            ctx_in: ctx.as_ptr() as u64,
            flags: BPF_F_TEST_XDP_LIVE_FRAMES,
            ..Default::default()
        };
        bpf(BPF_PROG_TEST_RUN, &mut attr).map(drop)
    }
}

/// The `struct xdp_md` a frame arrives with on `ifindex`, for
/// BPF_PROG_TEST_RUN: data, data_end, data_meta, ingress_ifindex,
/// rx_queue_index, egress_ifindex.
pub fn xdp_md(frame: &[u8], ifindex: u32) -> Vec<u8> {
    [0, frame.len() as u32, 0, ifindex, 0, 0]
        .iter()
        .flat_map(|v| v.to_ne_bytes())
        .collect()
}

/// Index of `iface` in the calling thread's namespace.
pub fn ifindex(iface: &str) -> Result<u32> {
    let name = CString::new(iface)?;
    // SAFETY: `name` is a NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    anyhow::ensure!(index != 0, "no interface {iface}");
    Ok(index)
}
