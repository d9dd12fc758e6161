//! A connection table at scale, written straight into the state maps as
//! the data path would have made it: UDP flows, each from a client
//! endpoint of its own and so with a mapping of its own. For the GC's
//! daemon test and the state benchmark.

use std::{collections::HashMap, net::Ipv4Addr, ops::Range};

use egress_common::flow::{Flow, IPPROTO_UDP, Mapping, PortKey};
use egress_user::{batch, datapath::State};

/// Flows per translation address (and per client address).
const PER_ADDR: u32 = 62_500;

/// The `i`-th client endpoint and its remote, from the tests' client range
/// 10.0.0.0/16.
pub fn endpoint(i: u32) -> ([u8; 4], u16, [u8; 4]) {
    let port = 1024 + (i % PER_ADDR) as u16;
    ([10, 0, 100, block(i)], port, [203, 0, 113, (i % 251) as u8])
}

fn block(i: u32) -> u8 {
    u8::try_from(i / PER_ADDR).expect("at most 256 blocks of flows")
}

/// The translation address of flow `i`: the tests' gateway address
/// (10.1.1.10) and those after it, one per block of ports, as a pool would.
fn nat_addr(i: u32) -> [u8; 4] {
    [10, 1, 1, 10 + block(i)]
}

/// The translation addresses flows `0..flows` use: the gateway's `snat`.
pub fn nat_addrs(flows: u32) -> Vec<Ipv4Addr> {
    (0..flows.div_ceil(PER_ADDR))
        .map(|b| nat_addr(b * PER_ADDR).into())
        .collect()
}

/// The `i`-th flow, both halves alike, last seen at `last_seen_ns`,
/// tunnelled from the tests' peer (10.0.1.10).
pub fn flow(i: u32, last_seen_ns: u64) -> Flow {
    let (client, sport, remote) = endpoint(i);
    Flow {
        client_addr: client,
        nat_addr: nat_addr(i),
        remote_addr: remote,
        peer_addr: [10, 0, 1, 10],
        client_port: sport.to_be_bytes(),
        nat_port: sport.to_be_bytes(),
        remote_port: 53u16.to_be_bytes(),
        proto: IPPROTO_UDP,
        created_ns: last_seen_ns,
        last_seen_ns,
        ..Flow::default()
    }
}

/// The pair of mapping entries `f` was made from, used at its creation.
pub fn mapping(f: &Flow) -> [(PortKey, Mapping); 2] {
    let client = (f.client_addr, f.client_port);
    Mapping::pair(IPPROTO_UDP, client, (f.nat_addr, f.nat_port), f.created_ns)
}

/// Inserts the flows numbered `range`, last seen at `last_seen(i)`, with
/// their mappings, and adds them to their clients' counts. In batches: a
/// million flows one entry a call took 8 s.
pub fn fill(state: &mut State, range: Range<u32>, last_seen: impl Fn(u32) -> u64) {
    let mut counts: HashMap<[u8; 4], u64> = HashMap::new();
    let (mut flows, mut mappings) = (Vec::new(), Vec::new());
    for i in range {
        let f = flow(i, last_seen(i));
        flows.extend([(f.out_key(), f), (f.in_key(), f)]);
        mappings.extend(mapping(&f));
        *counts.entry(f.client_addr).or_default() += 1;
    }
    batch::insert(&state.flows, &flows).unwrap();
    batch::insert(&state.mappings, &mappings).unwrap();
    for (client, n) in counts {
        let before = state.clients.get(&client, 0).unwrap_or(0);
        state.clients.insert(&client, &(before + n), 0).unwrap();
    }
}
