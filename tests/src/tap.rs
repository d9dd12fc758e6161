//! A packet socket on one interface that records the largest frame
//! received: taps see an skb after GRO and before TC ingress, so a frame
//! larger than the MTU proves the hook was handed a GRO aggregate.

use crate::netns::in_netns;
use anyhow::{Context, Result};
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

const POLL: Duration = Duration::from_millis(50);

pub struct Tap {
    largest: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Tap {
    /// Starts recording frames received on `iface` in `ns`.
    pub fn start(ns: &str, iface: &str) -> Result<Self> {
        let sock = in_netns(ns, || open(iface))?.with_context(|| format!("tap {iface} in {ns}"))?;
        let largest = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (max, flag) = (largest.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            // Only the length matters: MSG_TRUNC reports the whole frame's.
            let mut buf = [0u8; 64];
            while !flag.load(Ordering::Relaxed) {
                // SAFETY: `addr` and `buf` are writable and sized as passed.
                let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
                let mut addr_len = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
                let n = unsafe {
                    libc::recvfrom(
                        sock.as_raw_fd(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        libc::MSG_TRUNC,
                        (&raw mut addr).cast(),
                        &mut addr_len,
                    )
                };
                if n > 0 && addr.sll_pkttype != libc::PACKET_OUTGOING {
                    max.fetch_max(n as usize, Ordering::Relaxed);
                }
            }
        });
        Ok(Self {
            largest,
            stop,
            thread: Some(thread),
        })
    }

    /// The largest frame received so far, in bytes.
    pub fn largest(&self) -> usize {
        self.largest.load(Ordering::Relaxed)
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// An `AF_PACKET` socket bound to `iface`, with a receive timeout so the
/// reader notices `stop`.
fn open(iface: &str) -> io::Result<OwnedFd> {
    let all = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(all)) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let name = CString::new(iface)?;
    // SAFETY: `name` is NUL-terminated.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: zeroed sockaddr_ll is valid; the fields set below make it a bind address.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = all;
    addr.sll_ifindex = ifindex as i32;
    let timeout = libc::timeval {
        tv_sec: 0,
        tv_usec: POLL.as_micros() as libc::suseconds_t,
    };
    // SAFETY: valid descriptor, pointers and sizes.
    let ok = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&raw const addr).cast(),
            size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        ) == 0
            && libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const timeout).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            ) == 0
    };
    if !ok {
        return Err(io::Error::last_os_error());
    }
    Ok(sock)
}
