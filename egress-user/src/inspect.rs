//! Reading a gateway's pinned state from outside the daemon that owns it:
//! `egress stats`, `egress flows` and the metrics endpoint all go through
//! here, so they see the same numbers.

use std::{
    borrow::Borrow,
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
};

use anyhow::{Context as _, bail};
use aya::maps::{Array, HashMap, IterableMap as _, Map, MapData, PerCpuArray, PerCpuValues};
use egress_common::{
    flow::{
        DIR_IN, DIR_OUT, Flow, FlowKey, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, Mapping, PortKey,
    },
    flow_cache::CachedFlow,
    reason::Reason,
    tcp::TcpState,
};
use rustc_hash::FxHashMap;
use serde::Serialize;

use crate::{batch, pinning};

/// The pinned state maps of one gateway, opened read-only in spirit: nothing
/// here writes to them.
pub struct Pinned {
    flows: HashMap<MapData, FlowKey, Flow>,
    mappings: HashMap<MapData, PortKey, Mapping>,
    clients: HashMap<MapData, [u8; 4], u64>,
    stats: PerCpuArray<MapData, u64>,
    /// None under a daemon of a version before the flow cache, whose table
    /// counts every packet, or of one whose cache was a per-CPU array (see
    /// [`crate::upgrade`]), whose cached counts are then left out.
    cache: Option<Array<MapData, CachedFlow>>,
}

impl Pinned {
    /// Opens the maps pinned in `dir`.
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        if !pinning::has_state(dir) {
            bail!(
                "no gateway state in {}: is `egress run` running with this --state-dir?",
                dir.display()
            );
        }
        let open = |name: &str| {
            let path = dir.join(name);
            MapData::from_pin(&path)
                .and_then(Map::from_map_data)
                .with_context(|| {
                    format!(
                        "cannot open {} (needs root: uid 0 owns the pins; CAP_BPF is enough for it)",
                        path.display()
                    )
                })
        };
        let [flows, mappings, clients, stats, cache, ..] = pinning::PINNED_MAPS;
        let format = |name: &str| format!("{name} in {} has another format", dir.display());
        Ok(Self {
            flows: HashMap::try_from(open(flows)?).with_context(|| format(flows))?,
            mappings: HashMap::try_from(open(mappings)?).with_context(|| format(mappings))?,
            clients: HashMap::try_from(open(clients)?).with_context(|| format(clients))?,
            stats: PerCpuArray::try_from(open(stats)?).with_context(|| format(stats))?,
            cache: match dir.join(cache).exists() {
                true => match open(cache)? {
                    // An earlier version's per-CPU cache, until its daemon
                    // restarts and upgrades it: its counts are not added.
                    Map::PerCpuArray(_) => None,
                    map => Some(Array::try_from(map).with_context(|| format(cache))?),
                },
                false => None,
            },
        })
    }

    /// Packets per reason, summed over CPUs.
    pub fn stats(&self) -> anyhow::Result<Vec<(Reason, u64)>> {
        Reason::ALL
            .iter()
            .map(|&r| {
                let per_cpu: PerCpuValues<u64> = self.stats.get(&(r as u32), 0)?;
                Ok((r, per_cpu.iter().sum()))
            })
            .collect()
    }

    /// Every complete flow (both halves present), and how many entries
    /// the flow table holds.
    pub fn flows(&self) -> anyhow::Result<(Vec<Conn>, u64)> {
        let entries = counted_flows(&self.flows, self.cache.as_ref())?;
        let returns: FxHashMap<FlowKey, Flow> = entries
            .iter()
            .filter(|(k, _)| k.dir == DIR_IN)
            .map(|(k, f)| (*k, *f))
            .collect();
        let conns = entries
            .iter()
            .filter(|(k, _)| k.dir == DIR_OUT)
            .filter_map(|(_, out)| {
                returns.get(&out.in_key()).map(|inb| Conn {
                    out: *out,
                    inb: *inb,
                })
            })
            .collect();
        Ok((conns, entries.len() as u64))
    }

    /// Translation ports (or echo identifiers) reserved per translation
    /// address and protocol, and the entries of the mapping table they were
    /// counted in.
    pub fn ports_in_use(&self) -> anyhow::Result<(Vec<PortsInUse>, u64)> {
        let mappings = batch::dump(&self.mappings).context("cannot read MAPPINGS")?;
        let mut used: FxHashMap<([u8; 4], u8), u64> = FxHashMap::default();
        for (key, _) in &mappings {
            if key.dir == DIR_IN {
                *used.entry((key.addr, key.proto)).or_default() += 1;
            }
        }
        let mut used: Vec<_> = used
            .into_iter()
            .map(|((addr, proto), n)| (Ipv4Addr::from(addr), proto_name(proto), n))
            .collect();
        used.sort_unstable();
        Ok((used, mappings.len() as u64))
    }

    /// Entries and capacity of each state map, given the entries of the
    /// flow and mapping tables (counted by [`Pinned::flows`] and
    /// [`Pinned::ports_in_use`]: each a whole-table read, seconds at a
    /// million flows, not to be done twice).
    pub fn occupancy(
        &self,
        flow_entries: u64,
        mapping_entries: u64,
    ) -> anyhow::Result<[Occupancy; 3]> {
        let occupancy = |map: &'static str, data: &MapData, entries: usize| -> anyhow::Result<_> {
            Ok(Occupancy {
                map,
                entries: entries as u64,
                capacity: data.info()?.max_entries().into(),
            })
        };
        Ok([
            Occupancy {
                entries: flow_entries,
                ..occupancy("flows", self.flows.map(), 0)?
            },
            Occupancy {
                entries: mapping_entries,
                ..occupancy("mappings", self.mappings.map(), 0)?
            },
            occupancy(
                "client_flows",
                self.clients.map(),
                batch::dump(&self.clients)?.len(),
            )?,
        ])
    }
}

/// Translation ports reserved on an address for a protocol.
pub type PortsInUse = (Ipv4Addr, &'static str, u64);

/// Every entry of the flow table `flows`, with the packets the data path
/// counted in its flow cache `cache` (a block per CPU) added (see
/// `egress_common::flow_cache`).
///
/// The cache is read after the table: counts a slot hands to the table in
/// between are missed by this read (never counted twice), so a sum is never
/// above the true count, and a later read may be lower only by such counts.
pub fn counted_flows<T: Borrow<MapData>>(
    flows: &HashMap<T, FlowKey, Flow>,
    cache: Option<&Array<T, CachedFlow>>,
) -> anyhow::Result<Vec<(FlowKey, Flow)>> {
    let mut entries = batch::dump(flows).context("cannot read FLOWS")?;
    if let Some(cache) = cache {
        credit_cached(cache, &mut entries).context("cannot read FLOW_CACHE")?;
    }
    Ok(entries)
}

fn credit_cached<T: Borrow<MapData>>(
    cache: &Array<T, CachedFlow>,
    entries: &mut [(FlowKey, Flow)],
) -> anyhow::Result<()> {
    let mut slots: FxHashMap<FlowKey, Vec<CachedFlow>> = FxHashMap::default();
    for cached in batch::values(cache)? {
        if cached.packets > 0 {
            slots.entry(cached.key).or_default().push(cached);
        }
    }
    for (key, flow) in entries {
        for cached in slots.get(key).into_iter().flatten() {
            cached.credit(key, flow);
        }
    }
    Ok(())
}

/// How full one state map is.
#[derive(Clone, Copy, Debug)]
pub struct Occupancy {
    pub map: &'static str,
    pub entries: u64,
    pub capacity: u64,
}

/// Both halves of one flow.
#[derive(Clone, Copy, Debug)]
pub struct Conn {
    pub out: Flow,
    pub inb: Flow,
}

impl Conn {
    pub fn proto(&self) -> &'static str {
        proto_name(self.out.proto)
    }

    pub fn tcp_state(&self) -> Option<TcpState> {
        (self.out.proto == IPPROTO_TCP)
            .then(|| TcpState::of(self.out.tcp_flags, self.inb.tcp_flags))
    }

    pub fn client(&self) -> SocketAddrV4 {
        endpoint(self.out.client_addr, self.out.client_port)
    }

    pub fn translation(&self) -> SocketAddrV4 {
        endpoint(self.out.nat_addr, self.out.nat_port)
    }

    pub fn remote(&self) -> SocketAddrV4 {
        endpoint(self.out.remote_addr, self.out.remote_port)
    }

    pub fn bytes(&self) -> u64 {
        self.out.bytes + self.inb.bytes
    }

    /// What `egress flows` shows of this flow at monotonic time `now_ns`.
    pub fn row(&self, now_ns: u64) -> FlowRow {
        let seconds = |ns: u64| ns as f64 / 1e9;
        let rtt = |ns: u64| (ns != 0).then(|| seconds(ns));
        let last_seen = self.out.last_seen_ns.max(self.inb.last_seen_ns);
        FlowRow {
            client: self.client(),
            peer: Ipv4Addr::from(self.out.peer_addr),
            translation: self.translation(),
            remote: self.remote(),
            proto: self.proto(),
            state: self.tcp_state().map(TcpState::as_str),
            age_seconds: seconds(now_ns.saturating_sub(self.out.created_ns)),
            idle_seconds: seconds(now_ns.saturating_sub(last_seen)),
            out: Traffic::of(&self.out),
            back: Traffic::of(&self.inb),
            rtt_tunnel_seconds: rtt(self.out.rtt_ns),
            rtt_internet_seconds: rtt(self.inb.rtt_ns),
        }
    }
}

/// One flow as listed by `egress flows` (and its `--json`).
#[derive(Clone, Debug, Serialize)]
pub struct FlowRow {
    pub client: SocketAddrV4,
    /// The tunnel peer the flow's replies go to (the one its client's
    /// packets last came through).
    pub peer: Ipv4Addr,
    pub translation: SocketAddrV4,
    pub remote: SocketAddrV4,
    pub proto: &'static str,
    /// TCP only.
    pub state: Option<&'static str>,
    pub age_seconds: f64,
    pub idle_seconds: f64,
    /// Client → Internet.
    pub out: Traffic,
    /// Internet → client.
    #[serde(rename = "in")]
    pub back: Traffic,
    /// TCP handshake round trips, once measured.
    pub rtt_tunnel_seconds: Option<f64>,
    pub rtt_internet_seconds: Option<f64>,
}

#[derive(Clone, Copy, Debug, Serialize)]
pub struct Traffic {
    pub packets: u64,
    pub bytes: u64,
}

impl Traffic {
    fn of(half: &Flow) -> Self {
        Self {
            packets: half.packets,
            bytes: half.bytes,
        }
    }
}

impl FlowRow {
    /// Header of [`FlowRow::line`]'s columns.
    pub const HEADER: &str = "PROTO STATE        CLIENT                PEER            TRANSLATION           REMOTE                   AGE  PKTS OUT   BYTES OUT    PKTS IN    BYTES IN  RTT TUN  RTT NET";

    /// One line of the `egress flows` table.
    pub fn line(&self) -> String {
        let rtt = |s: Option<f64>| s.map_or("-".to_owned(), |s| format!("{:.1}ms", s * 1e3));
        format!(
            "{:<5} {:<12} {:<21} {:<15} {:<21} {:<21} {:>7.0}s {:>9} {:>11} {:>10} {:>11} {:>8} {:>8}",
            self.proto,
            self.state.unwrap_or("-"),
            self.client,
            self.peer,
            self.translation,
            self.remote,
            self.age_seconds,
            self.out.packets,
            self.out.bytes,
            self.back.packets,
            self.back.bytes,
            rtt(self.rtt_tunnel_seconds),
            rtt(self.rtt_internet_seconds),
        )
    }
}

pub fn proto_name(proto: u8) -> &'static str {
    match proto {
        IPPROTO_TCP => "tcp",
        IPPROTO_UDP => "udp",
        IPPROTO_ICMP => "icmp",
        _ => "other",
    }
}

fn endpoint(addr: [u8; 4], port: [u8; 2]) -> SocketAddrV4 {
    SocketAddrV4::new(addr.into(), u16::from_be_bytes(port))
}
