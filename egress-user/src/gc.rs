//! Expiry of idle flows, and of the mappings and client counts they leave
//! behind. The data path only creates state and stamps it with the last
//! packet's time and TCP flags; the daemon decides when it is dead.

use std::time::{Duration, Instant};

use aya::maps::{HashMap, MapData, MapError};
use egress_common::{
    flow::{DIR_IN, DIR_OUT, Flow, FlowKey, IPPROTO_ICMP, IPPROTO_TCP, Mapping, PortKey},
    tcp::TcpState,
};
use rustc_hash::{FxHashMap, FxHashSet};

use crate::{batch, datapath::State};

/// State that looks dead but may be in the middle of being created (a
/// mapping no flow uses yet, a flow half without its twin) is left alone
/// until it has been idle this long.
pub const GRACE: Duration = Duration::from_secs(10);

/// Idle timeouts by protocol and TCP state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// RFC 5382 REQ-5: at least 2 h 4 min.
    pub tcp_established: Duration,
    /// RFC 5382 REQ-5: handshake and teardown, at least 4 min.
    pub tcp_transitory: Duration,
    /// After a RST: the connection is over; the entry only absorbs stragglers.
    pub tcp_reset: Duration,
    /// RFC 4787 REQ-5: at least 2 min, 5 min recommended.
    pub udp: Duration,
    /// RFC 5508 REQ-1: ICMP query mappings, at least 60 s.
    pub icmp: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            tcp_established: Duration::from_secs(2 * 3600 + 4 * 60),
            tcp_transitory: Duration::from_secs(4 * 60),
            tcp_reset: Duration::from_secs(10),
            udp: Duration::from_secs(5 * 60),
            icmp: Duration::from_secs(60),
        }
    }
}

impl Timeouts {
    /// How long the flow with these halves may stay idle.
    pub fn of(&self, out: &Flow, inb: &Flow) -> Duration {
        match out.proto {
            IPPROTO_TCP => match TcpState::of(out.tcp_flags, inb.tcp_flags) {
                TcpState::Established => self.tcp_established,
                TcpState::Reset => self.tcp_reset,
                _ => self.tcp_transitory,
            },
            IPPROTO_ICMP => self.icmp,
            _ => self.udp,
        }
    }
}

/// Now on the clock `bpf_ktime_get_coarse_ns` reads (CLOCK_MONOTONIC).
pub fn monotonic_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always available on Linux");
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

/// What one sweep found and did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Sweep {
    /// Flows left, and flows removed (both halves each).
    pub live: usize,
    pub expired: usize,
    /// Mappings left, and mappings removed.
    pub mappings: usize,
    pub mappings_expired: usize,
    pub took: Duration,
}

/// Removes every flow idle past its timeout at time `now_ns`, then every
/// mapping no remaining flow uses, and brings the per-client flow counts
/// up to date. Halves left alone by an interrupted sweep or a failed insert
/// go too, once idle past the grace period.
///
/// The tables are read and pruned in bulk; within each flow (and mapping)
/// the side that admits new packets or flows goes first.
pub fn sweep(state: &mut State, timeouts: &Timeouts, now_ns: u64) -> anyhow::Result<Sweep> {
    let started = Instant::now();
    let idle = |last_ns: u64| Duration::from_nanos(now_ns.saturating_sub(last_ns));
    let flows = batch::dump(&state.flows)?;
    // Return halves by key, each marked once its outbound half claims it.
    let mut returns: FxHashMap<FlowKey, (&Flow, bool)> =
        FxHashMap::with_capacity_and_hasher(flows.len() / 2, Default::default());
    returns.extend(
        flows
            .iter()
            .filter(|(k, _)| k.dir == DIR_IN)
            .map(|(k, f)| (*k, (f, false))),
    );
    let mut sweep = Sweep::default();
    let mut live_clients: FxHashMap<[u8; 4], u64> = FxHashMap::default();
    let mut expired_clients: FxHashMap<[u8; 4], u64> = FxHashMap::default();
    let mut used: FxHashSet<PortKey> =
        FxHashSet::with_capacity_and_hasher(returns.len(), Default::default());
    let (mut dead_in, mut dead_out, mut lone) = (Vec::new(), Vec::new(), Vec::new());

    for (key, out) in flows.iter().filter(|(k, _)| k.dir == DIR_OUT) {
        let in_key = out.in_key();
        let Some((inb, claimed)) = returns.get_mut(&in_key) else {
            lone.push((*key, in_key, out.last_seen_ns));
            continue;
        };
        *claimed = true;
        if idle(out.last_seen_ns.max(inb.last_seen_ns)) <= timeouts.of(out, inb) {
            sweep.live += 1;
            *live_clients.entry(out.client_addr).or_default() += 1;
            used.insert(client_key(out));
        } else {
            dead_in.push(in_key);
            dead_out.push(*key);
            *expired_clients.entry(out.client_addr).or_default() += 1;
        }
    }
    // Return halves first: once they are gone no reply can use the flows.
    batch::delete(&state.flows, &dead_in)?;
    batch::delete(&state.flows, &dead_out)?;
    sweep.expired = dead_out.len();

    // Lone halves: what a cut-short sweep leaves, or flows created while
    // this sweep read the table (hence the grace period and second look).
    lone.extend(
        returns
            .iter()
            .filter(|(_, (_, claimed))| !claimed)
            .map(|(k, (f, _))| (*k, f.out_key(), f.last_seen_ns)),
    );
    for (key, twin, last_seen) in lone {
        if idle(last_seen) > GRACE && state.flows.get(&twin, 0).is_err() {
            remove(&mut state.flows, &key)?;
        }
    }

    let mappings: FxHashMap<PortKey, Mapping> = batch::dump(&state.mappings)?.into_iter().collect();
    let (mut dead_clients, mut dead_reservations) = (Vec::new(), Vec::new());
    let recent = |m: &Mapping| idle(m.used_ns) <= GRACE;
    for (key, m) in &mappings {
        let twin = PortKey {
            addr: m.addr,
            port: m.port,
            dir: if key.dir == DIR_OUT { DIR_IN } else { DIR_OUT },
            ..*key
        };
        if key.dir != DIR_OUT {
            // A reservation whose client side is gone (creation in progress,
            // or a cut-short sweep).
            if !mappings.contains_key(&twin) && !recent(m) {
                remove(&mut state.mappings, key)?;
            }
            continue;
        }
        // The second read catches a flow started from the mapping since
        // the table was read.
        if used.contains(key) || recent(m) || state.mappings.get(key, 0).is_ok_and(|m| recent(&m)) {
            sweep.mappings += 1;
        } else {
            dead_clients.push(*key);
            dead_reservations.push(twin);
        }
    }
    // Client sides first: once they are gone no new flow can use the ports.
    batch::delete(&state.mappings, &dead_clients)?;
    batch::delete(&state.mappings, &dead_reservations)?;
    sweep.mappings_expired = dead_clients.len();

    recount_clients(&mut state.clients, &live_clients, &expired_clients)?;
    sweep.took = started.elapsed();
    Ok(sweep)
}

/// The client-side mapping key a flow was created from.
fn client_key(out: &Flow) -> PortKey {
    PortKey {
        addr: out.client_addr,
        port: out.client_port,
        proto: out.proto,
        dir: DIR_OUT,
    }
}

/// Takes the expired flows off each client's count. The data path adds to
/// the counts concurrently, so a count is read just before it is written,
/// and never set below the live flows this sweep saw.
fn recount_clients(
    counts: &mut HashMap<&mut MapData, [u8; 4], u64>,
    live: &FxHashMap<[u8; 4], u64>,
    expired: &FxHashMap<[u8; 4], u64>,
) -> Result<(), MapError> {
    let clients: Vec<[u8; 4]> = counts.keys().collect::<Result<_, _>>()?;
    for client in clients.iter().chain(live.keys()) {
        let now = counts.get(client, 0).unwrap_or(0);
        let want = now
            .saturating_sub(expired.get(client).copied().unwrap_or(0))
            .max(live.get(client).copied().unwrap_or(0));
        match (want, now) {
            (w, n) if w == n => {}
            (0, _) => remove(counts, client)?,
            (w, _) => counts.insert(client, &w, 0)?,
        }
    }
    Ok(())
}

fn remove<K: aya::Pod, V: aya::Pod>(
    map: &mut HashMap<&mut MapData, K, V>,
    key: &K,
) -> Result<(), MapError> {
    match map.remove(key) {
        // Already gone: the twin of a half removed by an earlier sweep.
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        r => r,
    }
}

#[cfg(test)]
mod tests {
    use egress_common::{
        flow::IPPROTO_UDP,
        tcp::{ACK, FIN, RST, SYN},
    };

    use super::*;

    fn tcp(out: u8, inb: u8) -> (Flow, Flow) {
        let f = |tcp_flags| Flow {
            proto: IPPROTO_TCP,
            tcp_flags,
            ..Flow::default()
        };
        (f(out), f(inb))
    }

    #[test]
    fn timeouts_follow_protocol_and_tcp_state() {
        let t = Timeouts::default();
        let (o, i) = tcp(SYN | ACK, SYN | ACK);
        assert_eq!(t.of(&o, &i), Duration::from_secs(7440));
        let (o, i) = tcp(SYN, 0);
        assert_eq!(t.of(&o, &i), Duration::from_secs(240));
        let (o, i) = tcp(SYN | ACK | FIN, SYN | ACK);
        assert_eq!(t.of(&o, &i), Duration::from_secs(240));
        let (o, i) = tcp(SYN | ACK, RST);
        assert_eq!(t.of(&o, &i), Duration::from_secs(10));
        let udp = Flow {
            proto: IPPROTO_UDP,
            ..Flow::default()
        };
        assert_eq!(t.of(&udp, &udp), Duration::from_secs(300));
        let icmp = Flow {
            proto: IPPROTO_ICMP,
            ..Flow::default()
        };
        assert_eq!(t.of(&icmp, &icmp), Duration::from_secs(60));
    }
}
