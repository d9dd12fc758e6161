//! The kernel's neighbour entries for the data path's next hops, kept
//! verified.
//!
//! The data path forwards without the kernel's stack, so no traffic ever
//! confirms those entries: they go STALE and stay so, and
//! `bpf_fib_lookup` goes on answering with a STALE entry's MAC address,
//! right or wrong. A next hop replaced by one with another address (and
//! no gratuitous ARP) would never be learnt. Marked managed
//! (`NTF_EXT_MANAGED`), an entry is probed by the kernel
//! itself and resolved again when the probes fail; the new address then
//! reaches the data path as any neighbour change does (see
//! `Datapath::routes_changed`). Also marked externally learned, so the
//! kernel's garbage collector leaves it.

use std::{io, net::Ipv4Addr};

use crate::{
    netif,
    netlink::{Request, Socket},
};

/// `struct ndmsg` is 12 bytes: family, pad, ifindex, state, flags, type.
const NDMSG: usize = 12;
const NDA_DST: u16 = 1;
const NDA_FLAGS_EXT: u16 = 15;
const NTF_EXT_LEARNED: u8 = 0x10;
const NTF_EXT_MANAGED: u32 = 1;
const NUD_NOARP: u16 = 0x40;
const NUD_PERMANENT: u16 = 0x80;

/// The next hops of packets the gateway sends out of interface `ifindex`:
/// the gateway of every route by it (any table), and each of `peers`
/// reached directly.
pub fn next_hops(ifindex: u32, peers: &[Ipv4Addr]) -> io::Result<Vec<Ipv4Addr>> {
    let mut hops: Vec<Ipv4Addr> = netif::routes()?
        .into_iter()
        .filter(|r| r.oif == ifindex)
        .filter_map(|r| r.via)
        .collect();
    for &peer in peers {
        if let Some(route) = netif::route_to(peer)?
            && route.oif == ifindex
            && route.via.is_none()
        {
            hops.push(peer);
        }
    }
    hops.sort_unstable();
    hops.dedup();
    Ok(hops)
}

/// Marks the neighbour entry of `addr` on interface `ifindex` managed,
/// creating it if there is none (keeping its address if there is one).
/// An entry the operator made static (permanent, or no ARP) is left as it
/// is: `Ok(false)`.
pub fn manage(ifindex: u32, addr: Ipv4Addr) -> io::Result<bool> {
    if state(ifindex, addr)?.is_some_and(|s| s & (NUD_PERMANENT | NUD_NOARP) != 0) {
        return Ok(false);
    }
    let request = Request::new(libc::RTM_NEWNEIGH, &ndmsg(ifindex, NTF_EXT_LEARNED))
        .flags(libc::NLM_F_CREATE | libc::NLM_F_REPLACE)
        .attr(NDA_DST, &addr.octets())
        .attr(NDA_FLAGS_EXT, &NTF_EXT_MANAGED.to_ne_bytes());
    Socket::open(libc::NETLINK_ROUTE, 0)?.request(request)?;
    Ok(true)
}

/// The state (`NUD_*`) of the neighbour entry of `addr` on `ifindex`, if
/// there is one.
fn state(ifindex: u32, addr: Ipv4Addr) -> io::Result<Option<u16>> {
    let request =
        Request::new(libc::RTM_GETNEIGH, &ndmsg(ifindex, 0)).attr(NDA_DST, &addr.octets());
    match Socket::open(libc::NETLINK_ROUTE, 0)?.request(request) {
        Ok(answer) => Ok(answer.iter().find_map(|m| {
            let state = m.payload.get(8..10)?;
            Some(u16::from_ne_bytes([state[0], state[1]]))
        })),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Removes the neighbour entry of `addr` on interface `ifindex`: the
/// kernel resolves it again when it next needs it.
pub fn forget(ifindex: u32, addr: Ipv4Addr) -> io::Result<()> {
    let request =
        Request::new(libc::RTM_DELNEIGH, &ndmsg(ifindex, 0)).attr(NDA_DST, &addr.octets());
    match Socket::open(libc::NETLINK_ROUTE, 0)?.request(request) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        done => done.map(drop),
    }
}

fn ndmsg(ifindex: u32, flags: u8) -> [u8; NDMSG] {
    let mut m = [0u8; NDMSG];
    m[0] = libc::AF_INET as u8;
    m[4..8].copy_from_slice(&ifindex.to_ne_bytes());
    // State 0 (NUD_NONE): a managed entry is resolved by the kernel.
    m[10] = flags;
    m
}
