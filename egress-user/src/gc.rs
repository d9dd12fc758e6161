//! Expiry of idle flows, and of the mappings and client counts they leave
//! behind. The data path only creates state and stamps it with the last
//! packet's time and TCP flags; the daemon decides when it is dead.

use std::{
    net::Ipv4Addr,
    sync::{
        Arc, PoisonError, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::bail;
use aya::{
    Pod,
    maps::{HashMap, MapData, MapError},
};
use egress_common::{
    flow::{DIR_IN, DIR_OUT, Flow, FlowKey, IPPROTO_ICMP, IPPROTO_TCP, Mapping, PortKey},
    tcp::TcpState,
};
use rustc_hash::{FxHashMap, FxHashSet};

use crate::{
    admission::Admission,
    batch,
    datapath::{Policy, State},
};

/// State that looks dead but may be in the middle of being created (a
/// mapping no flow uses yet, a flow half without its twin) is left alone
/// for this long: a mapping until idle this long, a half until this old.
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
    /// RFC 5508 REQ-2: ICMP query mappings, at least 60 s.
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

/// What the policy lets flows use. A sweep removes the state the current
/// policy would not create: flows and mappings on a translation address
/// that is no longer ours (as MASQUERADE forgets its connections when its
/// address goes), and those of a peer or client no longer allowed. The
/// data path trusts a known flow's translation, so until then it goes on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Allowed {
    pub snat: Vec<Ipv4Addr>,
    pub admission: Admission,
}

impl Allowed {
    pub fn of(policy: &Policy) -> Self {
        Self {
            snat: policy.snat.clone(),
            admission: policy.admission.clone(),
        }
    }

    fn flow(&self, out: &Flow) -> bool {
        self.snat.contains(&out.nat_addr.into())
            && self
                .admission
                .allows(out.peer_addr.into(), out.client_addr.into())
    }

    /// Whether the mapping entry `key` → `m` (either side) is allowed.
    fn mapping(&self, key: &PortKey, m: &Mapping) -> bool {
        let (client, nat) = match key.dir {
            DIR_OUT => (key.addr, m.addr),
            _ => (m.addr, key.addr),
        };
        self.snat.contains(&nat.into()) && self.admission.is_client(client.into())
    }
}

/// The policy as of now, shared between the daemon, which replaces it when
/// it loads the data path again, and the sweeps.
pub type SharedAllowed = Arc<RwLock<Allowed>>;

fn current(allowed: &RwLock<Allowed>) -> Allowed {
    allowed
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .clone()
}

/// What one sweep found and did (an unfinished one: until it ended).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Sweep {
    /// Flows left, flows removed idle, and flows removed because the
    /// policy no longer allows them. A flow counts as removed once its
    /// return half is: no reply can use it then, and the outbound half a
    /// cut-short sweep leaves goes at the next sweep, uncounted.
    pub live: usize,
    pub expired: usize,
    pub disallowed: usize,
    /// Mappings left, and mappings removed (once the client side is).
    pub mappings: usize,
    pub mappings_expired: usize,
    pub took: Duration,
}

/// A sweep that an error (or a stop) ended part way, and what it had
/// removed by then.
#[derive(Debug)]
pub struct Unfinished {
    pub sweep: Sweep,
    pub error: anyhow::Error,
}

/// A request to stop, heeded by a sweep between two batches of map
/// operations. What a stopped sweep leaves half done, the next one finishes.
#[derive(Clone, Debug, Default)]
pub struct Stop(Arc<AtomicBool>);

impl Stop {
    pub fn request(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    pub fn requested(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    fn check(&self) -> anyhow::Result<()> {
        match self.requested() {
            true => bail!("stopped on request"),
            false => Ok(()),
        }
    }
}

/// Removes every flow idle past its timeout at time `now_ns` or no longer
/// `allowed`, then every mapping no remaining flow uses or no longer
/// allowed, and brings the per-client flow counts up to date. Halves left
/// alone by an interrupted sweep or a failed insert go too, once older
/// than the grace period, however busy: a lone half translates one way
/// only.
///
/// The tables are read and pruned in bulk, heeding `stop` between batches;
/// within each flow (and mapping) the side that admits new packets or
/// flows goes first. A sweep stopped or failed part way still sets its
/// clients' counts, once it has read the whole flow table, and reports
/// what it removed.
pub fn sweep(
    state: &mut State,
    timeouts: &Timeouts,
    allowed: &RwLock<Allowed>,
    now_ns: u64,
    stop: &Stop,
) -> Result<Sweep, Unfinished> {
    let started = Instant::now();
    let mut sweep = Sweep::default();
    let result = prune_and_recount(state, timeouts, allowed, now_ns, stop, &mut sweep);
    sweep.took = started.elapsed();
    match result {
        Ok(()) => Ok(sweep),
        Err(error) => Err(Unfinished { sweep, error }),
    }
}

/// The work of [`sweep`], each removal counted in `sweep` as it is made.
fn prune_and_recount(
    state: &mut State,
    timeouts: &Timeouts,
    allowed: &RwLock<Allowed>,
    now_ns: u64,
    stop: &Stop,
    sweep: &mut Sweep,
) -> anyhow::Result<()> {
    // Before the flows are read: what the data path counts after this, it
    // counts for flows the read may not see.
    let counted: FxHashMap<[u8; 4], u64> = read(&state.clients, stop)?.into_iter().collect();
    let mut clients = Clients::default();
    let pruned = prune(state, timeouts, allowed, now_ns, stop, &mut clients, sweep);
    let recounted = recount_clients(&mut state.clients, &counted, &clients);
    pruned?;
    Ok(recounted?)
}

/// Flows (outbound halves) per client address: those a sweep read, once
/// it has read the whole table, and those it removed.
#[derive(Default)]
struct Clients {
    read: Option<FxHashMap<[u8; 4], u64>>,
    removed: FxHashMap<[u8; 4], u64>,
}

/// A flow to remove: its return and outbound halves, and whether it
/// expired (else the policy no longer allows it).
struct Dead<'a> {
    inb: (FlowKey, &'a Flow),
    out: (FlowKey, &'a Flow),
    expired: bool,
}

fn prune(
    state: &State,
    timeouts: &Timeouts,
    allowed: &RwLock<Allowed>,
    now_ns: u64,
    stop: &Stop,
    clients: &mut Clients,
    sweep: &mut Sweep,
) -> anyhow::Result<()> {
    let idle = |last_ns: u64| Duration::from_nanos(now_ns.saturating_sub(last_ns));
    let flows = read(&state.flows, stop)?;
    let mut read_clients = FxHashMap::default();
    for (_, out) in flows.iter().filter(|(k, _)| k.dir == DIR_OUT) {
        *read_clients.entry(out.client_addr).or_default() += 1;
    }
    clients.read = Some(read_clients);
    // Taken after the read: the daemon replaces the policy before it loads
    // a data path that makes flows under it, so every flow read is judged
    // by the policy it was made under, or a later one.
    let policy = current(allowed);
    // Return halves by key, each marked once its outbound half claims it.
    let mut returns: FxHashMap<FlowKey, (&Flow, bool)> =
        FxHashMap::with_capacity_and_hasher(flows.len() / 2, Default::default());
    returns.extend(
        flows
            .iter()
            .filter(|(k, _)| k.dir == DIR_IN)
            .map(|(k, f)| (*k, (f, false))),
    );
    let mut used: FxHashSet<PortKey> =
        FxHashSet::with_capacity_and_hasher(returns.len(), Default::default());
    let (mut dead, mut lone) = (Vec::new(), Vec::new());

    for (key, out) in flows.iter().filter(|(k, _)| k.dir == DIR_OUT) {
        let in_key = out.in_key();
        let Some((inb, claimed)) = returns.get_mut(&in_key) else {
            lone.push((*key, in_key, out));
            continue;
        };
        *claimed = true;
        let expired = if !policy.flow(out) {
            false
        } else if idle(out.last_seen_ns.max(inb.last_seen_ns)) <= timeouts.of(out, inb) {
            sweep.live += 1;
            used.insert(client_key(out));
            continue;
        } else {
            true
        };
        dead.push(Dead {
            inb: (in_key, *inb),
            out: (*key, out),
            expired,
        });
    }
    // Return halves first: once they are gone no reply can use the flows.
    let halves: Vec<_> = dead.iter().map(|d| d.inb).collect();
    let (gone, result) = delete_halves(&state.flows, &halves, stop, clients);
    for d in &dead[..gone] {
        match d.expired {
            true => sweep.expired += 1,
            false => sweep.disallowed += 1,
        }
    }
    result?;
    let halves: Vec<_> = dead.iter().map(|d| d.out).collect();
    delete_halves(&state.flows, &halves, stop, clients).1?;

    // Lone halves: what a cut-short sweep leaves, or flows created while
    // this sweep read the table (hence the grace period and second look).
    // By age, not idleness: a client still sending would keep a lone
    // outbound half alive forever, its replies unmatched.
    lone.extend(
        returns
            .iter()
            .filter(|(_, (_, claimed))| !claimed)
            .map(|(k, (f, _))| (*k, f.out_key(), *f)),
    );
    let mut orphans = Vec::new();
    for (key, twin, half) in lone {
        stop.check()?;
        if idle(half.created_ns) > GRACE && state.flows.get(&twin, 0).is_err() {
            orphans.push((key, half));
        }
    }
    delete_halves(&state.flows, &orphans, stop, clients).1?;

    let mappings: FxHashMap<PortKey, Mapping> = read(&state.mappings, stop)?.into_iter().collect();
    let policy = current(allowed);
    let (mut unused, mut orphans) = (Vec::new(), Vec::new());
    let recent = |m: &Mapping| idle(m.used_ns) <= GRACE;
    for (key, m) in &mappings {
        if !policy.mapping(key, m) {
            // No second look: a flow made from it since goes next sweep.
            orphans.push(*key);
            continue;
        }
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
                orphans.push(*key);
            }
        } else if used.contains(key) || recent(m) {
            sweep.mappings += 1;
        } else {
            unused.push((*key, twin));
        }
    }
    delete(&state.mappings, &orphans, stop).1?;
    for batch in unused.chunks(batch::CHUNK) {
        stop.check()?;
        // The second read catches a flow started from the mapping since
        // the table was read.
        let (dead, live): (Vec<_>, Vec<_>) = batch
            .iter()
            .partition(|(key, _)| !state.mappings.get(key, 0).is_ok_and(|m| recent(&m)));
        sweep.mappings += live.len();
        // Client sides first: once they are gone no new flow can use the ports.
        let (dead_clients, dead_reservations): (Vec<_>, Vec<_>) = dead.into_iter().unzip();
        let (gone, result) = batch::delete(&state.mappings, &dead_clients);
        sweep.mappings_expired += gone;
        result?;
        batch::delete(&state.mappings, &dead_reservations).1?;
    }
    Ok(())
}

/// Every entry of `map`, read a batch at a time.
fn read<K: Pod, V: Pod>(map: &HashMap<MapData, K, V>, stop: &Stop) -> anyhow::Result<Vec<(K, V)>> {
    let mut entries = Vec::new();
    for batch in batch::batches(map) {
        stop.check()?;
        entries.extend(batch?);
    }
    Ok(entries)
}

/// Deletes `keys` from `map` a batch at a time, in order; returns how
/// many of the leading keys are gone, all of them unless a stop or an
/// error ended it part way, and that.
fn delete<K: Pod, V: Pod>(
    map: &HashMap<MapData, K, V>,
    keys: &[K],
    stop: &Stop,
) -> (usize, anyhow::Result<()>) {
    let mut gone = 0;
    for batch in keys.chunks(batch::CHUNK) {
        if let Err(e) = stop.check() {
            return (gone, Err(e));
        }
        let (deleted, result) = batch::delete(map, batch);
        gone += deleted;
        if let Err(e) = result {
            return (gone, Err(e.into()));
        }
    }
    (gone, Ok(()))
}

/// Deletes flow halves as [`delete`] does; each outbound half removed is a
/// flow its client no longer has (the data path counts a flow when it
/// inserts the outbound half).
fn delete_halves(
    flows: &HashMap<MapData, FlowKey, Flow>,
    halves: &[(FlowKey, &Flow)],
    stop: &Stop,
    clients: &mut Clients,
) -> (usize, anyhow::Result<()>) {
    let keys: Vec<FlowKey> = halves.iter().map(|(k, _)| *k).collect();
    let (gone, result) = delete(flows, &keys, stop);
    for (_, f) in halves[..gone].iter().filter(|(k, _)| k.dir == DIR_OUT) {
        *clients.removed.entry(f.client_addr).or_default() += 1;
    }
    (gone, result)
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

/// Sets each client's count to the flows it has: those the sweep read
/// and left, plus those the data path counted since `counted` was read (it
/// counts a flow as it inserts the outbound half; only sweeps take counts
/// down). Absolute, so a count left too high (a daemon killed between
/// removing flows and counting them off) is mended. A flow made while the
/// table was read may be counted twice until the next sweep; only one the
/// data path counts between a count's read and its write here goes
/// uncounted until then. Until the table is read whole nothing is removed,
/// and the counts are left alone.
fn recount_clients(
    counts: &mut HashMap<MapData, [u8; 4], u64>,
    counted: &FxHashMap<[u8; 4], u64>,
    clients: &Clients,
) -> Result<(), MapError> {
    let Some(read) = &clients.read else {
        return Ok(());
    };
    let mut all: FxHashSet<[u8; 4]> = counts.keys().collect::<Result<_, _>>()?;
    all.extend(read.keys().chain(counted.keys()));
    let of = |m: &FxHashMap<[u8; 4], u64>, client| m.get(client).copied().unwrap_or(0);
    for client in &all {
        let now = counts.get(client, 0).unwrap_or(0);
        let kept = of(read, client).saturating_sub(of(&clients.removed, client));
        let want = kept + now.saturating_sub(of(counted, client));
        match (want, now) {
            (w, n) if w == n => {}
            (0, _) => counts.remove(client)?,
            (w, _) => counts.insert(client, &w, 0)?,
        }
    }
    Ok(())
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
