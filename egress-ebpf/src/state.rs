//! Connection state: endpoint-independent mappings, the flows created from
//! them, and what each packet records in its flow.

use core::{
    ffi::c_void,
    intrinsics::{AtomicOrdering, atomic_xadd},
};

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_loop},
};
use egress_common::{
    config::Config,
    flow::{DIR_OUT, Flow, FlowKey, Mapping, PortKey},
    ports::{candidate, tries},
    reason::Reason,
    tcp,
};

use crate::maps::{CLIENT_FLOWS, FLOWS, MAPPINGS, NEW_FLOW};

const EEXIST: i32 = 17;
const NOEXIST: u64 = BPF_NOEXIST as u64;

/// The flows' clock (see `clock`) to the nanosecond, for round-trip times: a tick (up to
/// 4 ms) is more than many round trips. Only read on handshake segments.
#[inline(always)]
fn precise_now() -> u64 {
    // SAFETY: no preconditions.
    unsafe { bpf_ktime_get_ns() }
}

/// The flow half stored under `key`, if any.
#[inline(always)]
pub fn find(key: &FlowKey) -> Option<&'static mut Flow> {
    // SAFETY: a valid map value for as long as the program runs. The
    // daemon's sweep may delete the entry meanwhile (a flow idle past its
    // timeout, a lone half, one the policy no longer allows) and the
    // kernel reuse its memory for a new flow: the fields we write are
    // counters, flags and timestamps, where one packet's stray update does
    // no lasting harm.
    FLOWS.get_ptr_mut(key).map(|f| unsafe { &mut *f })
}

/// Creates the flow for an outbound packet with tuple `key` from `peer`,
/// translated with the client's mapping (created if it has none); [`find`]
/// returns it afterwards.
///
/// The mapping makes the return tuple unique to this client, so the return
/// half can go in first with `BPF_NOEXIST`: if it exists, another CPU is
/// creating this very flow, and whichever outbound insert wins, both halves
/// end up present and identical. A half is only withdrawn by the CPU that
/// inserted it, when the table is full.
///
/// A function of its own (first packets only): inlined, the flow and
/// mapping values it builds would push the program past the BPF stack. (So
/// it returns no more than fits the one BPF return register.) The flow is
/// built in [`NEW_FLOW`], not on its stack: kernels before 6.9 count each
/// frame rounded up to 32 bytes, and with the flow this frame and the
/// program's came to 544 of the 512 bytes.
#[inline(never)]
pub fn create(key: &FlowKey, peer: [u8; 4], cfg: &Config, now: u64) -> Result<(), Reason> {
    admit(key.src, cfg)?;
    let (nat_addr, nat_port) = mapping(key, cfg, now)?;
    let Some(flow) = NEW_FLOW.get_ptr_mut(0) else {
        return Err(Reason::Internal);
    };
    // SAFETY: this CPU's slot; programs do not nest on a CPU.
    let flow = unsafe { &mut *flow };
    *flow = Flow {
        client_addr: key.src,
        nat_addr,
        remote_addr: key.dst,
        peer_addr: peer,
        client_port: key.sport,
        nat_port,
        remote_port: key.dport,
        proto: key.proto,
        tcp_flags: 0,
        created_ns: now,
        last_seen_ns: now,
        packets: 0,
        bytes: 0,
        handshake_ns: 0,
        rtt_ns: 0,
    };
    let in_key = flow.in_key();
    let inserted_in = match FLOWS.insert(&in_key, flow, NOEXIST) {
        Ok(()) => true,
        // Another CPU creating this very flow, or an earlier flow of this
        // client on the same tuples. Another client's flow would mean its
        // mapping was swept from under it (the sweep races a reuse): its
        // replies must not come here.
        Err(e) if e == -EEXIST => match find(&in_key) {
            Some(f) if f.client_addr == key.src && f.client_port == key.sport => false,
            _ => return Err(Reason::Internal),
        },
        Err(_) => return Err(Reason::TableFull),
    };
    match FLOWS.insert(key, flow, NOEXIST) {
        Ok(()) => count_client(key.src),
        Err(e) if e == -EEXIST => {}
        Err(_) => {
            if inserted_in {
                // Best effort: should it fail, the daemon's sweep removes
                // the lone half.
                let _ = FLOWS.remove(&in_key);
            }
            return Err(Reason::TableFull);
        }
    }
    Ok(())
}

/// Refuses a new flow to a client at its cap (RFC 6888 REQ-4).
#[inline(always)]
fn admit(client: [u8; 4], cfg: &Config) -> Result<(), Reason> {
    if cfg.max_client_flows == 0 {
        return Ok(());
    }
    // SAFETY: a plain read of a counter.
    match unsafe { CLIENT_FLOWS.get(&client) } {
        Some(&n) if n >= u64::from(cfg.max_client_flows) => Err(Reason::ClientLimit),
        _ => Ok(()),
    }
}

#[inline(always)]
fn count_client(client: [u8; 4]) {
    if CLIENT_FLOWS.insert(&client, &1u64, NOEXIST).is_ok() {
        return;
    }
    if let Some(n) = CLIENT_FLOWS.get_ptr_mut(&client) {
        // SAFETY: a valid, aligned map value; other CPUs update it
        // atomically too. (The BPF target has no compare-and-swap, so
        // `core::sync::atomic` offers no fetch_add; the add itself is a
        // single BPF atomic instruction.)
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(n, 1) };
    }
}

/// The translation address and port for the client side of `key`: its
/// existing mapping, or a new one (RFC 4787 REQ-1, endpoint-independent).
///
/// A new mapping first reserves its translation port with the
/// translated-side entry (`BPF_NOEXIST` makes the reservation atomic, and a
/// port in use moves on to the next candidate), then publishes the
/// client-side entry. Losing that second race to another CPU withdraws our
/// reservation and takes the winner's mapping.
#[inline(always)]
fn mapping(key: &FlowKey, cfg: &Config, now: u64) -> Result<([u8; 4], [u8; 2]), Reason> {
    let client = PortKey {
        addr: key.src,
        port: key.sport,
        proto: key.proto,
        dir: DIR_OUT,
    };
    if let Some(m) = MAPPINGS.get_ptr_mut(&client) {
        // SAFETY: a valid map value; `used_ns` is only a hint to the sweep.
        let m = unsafe { &mut *m };
        m.used_ns = now;
        return Ok((m.addr, m.port));
    }
    let nat_addr = cfg.snat_for(key.src);
    let port = reserve_port(key, nat_addr, cfg, now)?;
    let [(out_key, out), (in_key, _)] =
        Mapping::pair(key.proto, (key.src, key.sport), (nat_addr, port), now);
    match MAPPINGS.insert(&out_key, &out, NOEXIST) {
        Ok(()) => Ok((nat_addr, port)),
        Err(e) => {
            // The reservation is ours alone: nothing else can be using it.
            let _ = MAPPINGS.remove(&in_key);
            if e != -EEXIST {
                return Err(Reason::TableFull);
            }
            // SAFETY: a plain read of the winner's mapping.
            match unsafe { MAPPINGS.get(&out_key) } {
                Some(m) => Ok((m.addr, m.port)),
                None => Err(Reason::Internal),
            }
        }
    }
}

/// Reserves a free translation port on `nat_addr` for the client side of
/// `key`: inserts the translated-side entry of the first candidate port
/// (see [`candidate`]) not in use, by a `bpf_loop` callback the verifier
/// checks once for any number of tries.
#[inline(always)]
fn reserve_port(
    key: &FlowKey,
    nat_addr: [u8; 4],
    cfg: &Config,
    now: u64,
) -> Result<[u8; 2], Reason> {
    let mut search = PortSearch {
        client: (key.src, key.sport),
        proto: key.proto,
        nat_addr,
        min: cfg.port_min,
        max: cfg.port_max,
        // SAFETY: no preconditions.
        random: unsafe { bpf_get_prandom_u32() },
        now,
        reserved: Err(Reason::PortsExhausted),
    };
    // SAFETY: the callback takes `search` for what it is, and only while
    // this call lasts.
    let ran = unsafe {
        bpf_loop(
            tries(cfg.port_min, cfg.port_max),
            try_port as *mut c_void,
            (&raw mut search).cast(),
            0,
        )
    };
    if ran < 0 {
        return Err(Reason::Internal);
    }
    search.reserved
}

/// The state of [`reserve_port`]'s loop: what the candidates are made from,
/// and the port reserved (or why none is, once the loop stopped).
struct PortSearch {
    client: ([u8; 4], [u8; 2]),
    proto: u8,
    nat_addr: [u8; 4],
    min: u16,
    max: u16,
    random: u32,
    now: u64,
    reserved: Result<[u8; 2], Reason>,
}

/// Tries candidate `attempt` (the `bpf_loop` callback of [`reserve_port`]):
/// 0 to go on to the next (the port is in use), 1 to stop.
extern "C" fn try_port(attempt: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `reserve_port`'s `PortSearch`, alive while the loop runs.
    let search = unsafe { &mut *ctx.cast::<PortSearch>() };
    let client_port = u16::from_be_bytes(search.client.1);
    let port = candidate(
        client_port,
        search.min,
        search.max,
        search.random,
        attempt as u32,
    )
    .to_be_bytes();
    let [_, (in_key, inb)] = Mapping::pair(
        search.proto,
        search.client,
        (search.nat_addr, port),
        search.now,
    );
    search.reserved = match MAPPINGS.insert(&in_key, &inb, NOEXIST) {
        Ok(()) => Ok(port),
        Err(e) if e == -EEXIST => return 0,
        Err(_) => Err(Reason::TableFull),
    };
    1
}

/// Sends the return traffic of the flow whose outbound half is `out` to
/// `peer` from now on (this CPU at once, other CPUs' caches within a tick).
#[inline(always)]
pub fn move_to_peer(out: &mut Flow, peer: [u8; 4]) {
    out.peer_addr = peer;
    if let Some(inb) = find(&out.in_key()) {
        inb.peer_addr = peer;
    }
}

/// Accounts one packet of `bytes` to a flow half.
#[inline(always)]
pub fn touch(flow: &mut Flow, bytes: u16, now: u64) {
    flow.last_seen_ns = now;
    flow.packets += 1;
    flow.bytes += u64::from(bytes);
}

/// Records an outbound TCP segment's `flags` in the flow's outbound half:
/// a new connection on the same tuple restarts both halves' records, the
/// SYN stamps the handshake, and the client's first ACK after the server's
/// SYN-ACK gives the tunnel leg's round trip.
#[inline(always)]
pub fn track_out(out: &mut Flow, flags: u8) {
    if tcp::reopens(out.tcp_flags, flags) {
        out.tcp_flags = 0;
        out.rtt_ns = 0;
        if let Some(inb) = find(&out.in_key()) {
            inb.tcp_flags = 0;
            inb.handshake_ns = 0;
            inb.rtt_ns = 0;
        }
    }
    if flags & (tcp::SYN | tcp::ACK) == tcp::SYN {
        out.handshake_ns = precise_now();
    } else if flags & tcp::ACK != 0
        && out.tcp_flags & tcp::ACK == 0
        && let Some(inb) = find(&out.in_key())
        && inb.handshake_ns != 0
    {
        out.rtt_ns = precise_now().saturating_sub(inb.handshake_ns);
    }
    out.tcp_flags = tcp::record(out.tcp_flags, flags);
}

/// Records a return TCP segment's `flags` in the flow's return half: the
/// server's first SYN-ACK stamps the handshake and gives the Internet leg's
/// round trip since the client's SYN.
#[inline(always)]
pub fn track_in(inb: &mut Flow, flags: u8) {
    if flags & (tcp::SYN | tcp::ACK) == tcp::SYN | tcp::ACK && inb.handshake_ns == 0 {
        let now = precise_now();
        inb.handshake_ns = now;
        if let Some(out) = find(&inb.out_key())
            && out.handshake_ns != 0
        {
            inb.rtt_ns = now.saturating_sub(out.handshake_ns);
        }
    }
    inb.tcp_flags = tcp::record(inb.tcp_flags, flags);
}
