//! Which peers may tunnel to the gateway, and for which clients (inner
//! source addresses). The data path asks once per new flow, and when a
//! flow moves to another peer, through the PEERS and CLIENTS maps made
//! here; the sweeps ask [`Admission::allows`] of the flows already there.

use std::{collections::BTreeMap, net::Ipv4Addr};

use anyhow::bail;
use egress_common::{
    config::{MAX_CLIENT_RANGES, MAX_PEERS},
    peers::PeerSet,
};
use ipnet::Ipv4Net;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Admission {
    /// Outer source addresses allowed to send IP-in-IP.
    pub peers: Vec<Ipv4Addr>,
    /// Inner source ranges that may be translated: nothing else ever is.
    pub client_cidrs: Vec<Ipv4Net>,
    /// Peers bound to some of those ranges (as WireGuard binds a peer to
    /// its allowed IPs): a peer listed here may send only for its own
    /// ranges, so it can neither use nor take over another peer's clients'
    /// flows. Any other peer may send for every client range.
    pub peer_clients: BTreeMap<Ipv4Addr, Vec<Ipv4Net>>,
}

impl Admission {
    /// The ranges `peer` may send for.
    fn ranges(&self, peer: &Ipv4Addr) -> &[Ipv4Net] {
        self.peer_clients
            .get(peer)
            .map_or(&self.client_cidrs, Vec::as_slice)
    }

    /// Whether `peer` may tunnel packets from `client`.
    pub fn allows(&self, peer: Ipv4Addr, client: Ipv4Addr) -> bool {
        self.peers.contains(&peer) && self.ranges(&peer).iter().any(|r| r.contains(&client))
    }

    /// Whether `client` may be translated at all.
    pub fn is_client(&self, client: Ipv4Addr) -> bool {
        self.client_cidrs.iter().any(|r| r.contains(&client))
    }

    /// Peers left unbound where others are bound: those can still take
    /// over the bound peers' clients' flows, which binding them meant to
    /// prevent.
    pub fn unbound_beside_bound(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        let any_bound = !self.peer_clients.is_empty();
        self.peers
            .iter()
            .copied()
            .filter(move |p| any_bound && !self.peer_clients.contains_key(p))
    }

    /// The data path's PEERS map: every peer and its index.
    pub fn peer_indices(&self) -> impl Iterator<Item = (Ipv4Addr, u8)> + '_ {
        // `validate` keeps the peers within the indices.
        self.peers.iter().copied().zip(0..=u8::MAX)
    }

    /// The data path's CLIENTS map: every range named anywhere, with the
    /// peers that may send for the addresses it is the longest match of.
    /// Those are the peers with a range that covers it whole: a range of
    /// theirs inside it is an entry of its own, which such addresses match
    /// first.
    pub fn client_ranges(&self) -> Vec<(Ipv4Net, PeerSet)> {
        self.named_ranges()
            .into_iter()
            .map(|range| {
                let mut peers = PeerSet::default();
                for (peer, index) in self.peer_indices() {
                    if self.ranges(&peer).iter().any(|r| r.contains(&range)) {
                        peers.insert(index);
                    }
                }
                (range, peers)
            })
            .collect()
    }

    /// Every range named anywhere, once.
    fn named_ranges(&self) -> Vec<Ipv4Net> {
        let mut ranges: Vec<Ipv4Net> = self
            .client_cidrs
            .iter()
            .chain(self.peer_clients.values().flatten())
            .map(Ipv4Net::trunc)
            .collect();
        ranges.sort_unstable();
        ranges.dedup();
        ranges
    }

    /// Errors name the setting to fix.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.peers.is_empty() {
            bail!(
                "no tunnel peers: give --peer (or `peer` in the config file); without one nothing may tunnel to this host"
            );
        }
        if self.client_cidrs.is_empty() {
            bail!(
                "no client ranges: give --client-cidr (or `client-cidr`); without one nothing is translated"
            );
        }
        if self.peers.len() > MAX_PEERS as usize {
            bail!("peer: at most {MAX_PEERS} tunnel peers");
        }
        for (peer, ranges) in &self.peer_clients {
            if !self.peers.contains(peer) {
                bail!("peer-clients: {peer} is not one of the tunnel peers (`peer`)");
            }
            if ranges.is_empty() {
                bail!(
                    "peer-clients: no ranges for {peer}; give at least one, or remove it from `peer`"
                );
            }
            if let Some(r) = ranges.iter().find(|r| !self.covers(r)) {
                bail!("peer-clients: {r} of {peer} is not inside any `client-cidr` range");
            }
        }
        if self.named_ranges().len() > MAX_CLIENT_RANGES as usize {
            bail!(
                "client-cidr: at most {MAX_CLIENT_RANGES} client ranges, counting those only in peer-clients"
            );
        }
        Ok(())
    }

    fn covers(&self, range: &Ipv4Net) -> bool {
        self.client_cidrs.iter().any(|c| c.contains(range))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    /// Peer 10.0.1.10 unbound; 10.0.1.11 bound to a /24 inside the /16.
    fn two_peers() -> Admission {
        Admission {
            peers: vec![Ipv4Addr::new(10, 0, 1, 10), Ipv4Addr::new(10, 0, 1, 11)],
            client_cidrs: vec![net("10.0.0.0/16"), net("192.168.250.0/30")],
            peer_clients: [(Ipv4Addr::new(10, 0, 1, 11), vec![net("10.0.7.0/24")])].into(),
        }
    }

    /// The longest of `ranges` that holds `addr`, as the kernel's LPM trie
    /// finds it.
    fn longest_match(ranges: &[(Ipv4Net, PeerSet)], addr: Ipv4Addr) -> Option<PeerSet> {
        ranges
            .iter()
            .filter(|(r, _)| r.contains(&addr))
            .max_by_key(|(r, _)| r.prefix_len())
            .map(|&(_, peers)| peers)
    }

    #[test]
    fn a_bound_peer_sends_only_for_its_own_ranges() {
        let a = two_peers();
        let (free, bound) = (a.peers[0], a.peers[1]);
        let (mine, other) = (Ipv4Addr::new(10, 0, 7, 9), Ipv4Addr::new(10, 0, 8, 9));
        assert!(a.allows(free, mine) && a.allows(free, other));
        assert!(a.allows(bound, mine) && !a.allows(bound, other));
        assert!(!a.allows(bound, Ipv4Addr::new(192, 168, 250, 1)));
        assert!(!a.allows(Ipv4Addr::new(10, 0, 1, 12), mine));
    }

    #[test]
    fn bad_bindings_are_clear_errors() {
        let rejected = |change: fn(&mut Admission), says: &str| {
            let mut a = two_peers();
            change(&mut a);
            let e = a.validate().unwrap_err().to_string();
            assert!(e.contains(says), "{e:?} does not say {says:?}");
        };
        rejected(
            |a| {
                a.peer_clients.insert(Ipv4Addr::new(10, 0, 1, 99), vec![]);
            },
            "10.0.1.99 is not one of the tunnel peers",
        );
        rejected(
            |a| {
                a.peer_clients.insert(a.peers[0], vec![]);
            },
            "no ranges for 10.0.1.10",
        );
        rejected(
            |a| {
                a.peer_clients.insert(a.peers[0], vec![net("10.0.0.0/8")]);
            },
            "10.0.0.0/8 of 10.0.1.10 is not inside any `client-cidr` range",
        );
        rejected(|a| a.peers.clear(), "--peer");
        rejected(|a| a.client_cidrs.clear(), "--client-cidr");
        assert!(two_peers().validate().is_ok());
    }

    /// Addresses from a few small neighbourhoods, so that ranges and
    /// addresses overlap often.
    fn addr() -> impl Strategy<Value = Ipv4Addr> {
        (0u8..3, 0u8..4, any::<u8>()).prop_map(|(a, b, c)| Ipv4Addr::new(10, a, b, c))
    }

    fn range() -> impl Strategy<Value = Ipv4Net> {
        (addr(), 14u8..=32).prop_map(|(a, len)| Ipv4Net::new(a, len).unwrap())
    }

    proptest! {
        /// What the data path's maps answer (the peer's index in the
        /// longest match's peer set) is what the policy says, for any peers
        /// bound to any ranges.
        #[test]
        fn the_maps_answer_as_the_policy(
            client_cidrs in proptest::collection::vec(range(), 1..4),
            bindings in proptest::collection::vec(proptest::collection::vec(range(), 0..3), 1..5),
            peer in 0usize..5,
            client in addr(),
        ) {
            let peers: Vec<Ipv4Addr> = (0..bindings.len() as u8).map(|i| Ipv4Addr::new(10, 0, 1, i)).collect();
            let peer_clients = peers
                .iter()
                .zip(&bindings)
                .filter(|(_, b)| !b.is_empty())
                .map(|(&p, b)| (p, b.clone()))
                .collect();
            let a = Admission { peers, client_cidrs, peer_clients };
            let peer = a.peers.get(peer).copied().unwrap_or(Ipv4Addr::new(10, 0, 2, 1));
            let index = a.peer_indices().find(|&(p, _)| p == peer).map(|(_, i)| i);
            let answer = index
                .zip(longest_match(&a.client_ranges(), client))
                .is_some_and(|(i, peers)| peers.contains(i));
            prop_assert_eq!(answer, a.allows(peer, client));
            // And a valid binding only narrows the client ranges.
            if a.validate().is_ok() {
                prop_assert!(!answer || a.is_client(client));
            }
        }
    }
}
