//! Read-only settings handed to the eBPF programs as a load-time global.

/// Most translation (SNAT) addresses one gateway can use.
pub const MAX_SNAT_ADDRS: usize = 16;
/// Most tunnel peers, and client ranges, the policy maps hold.
pub const MAX_PEERS: u32 = 256;
pub const MAX_CLIENT_RANGES: u32 = 1024;

/// TTL of the outer header we add: enough to cross any VPC peering path.
pub const OUTER_TTL: u8 = 64;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Address peers send IP-in-IP to; source of the outer headers we build.
    pub tunnel_local: [u8; 4],
    /// Translation port (and ICMP identifier) range, inclusive, host order.
    pub port_min: u16,
    pub port_max: u16,
    /// Number of valid entries in `snat_addrs`, at least 1 once configured.
    pub snat_count: u32,
    /// Most flows one client address may have at once; 0 for no limit.
    pub max_client_flows: u32,
    /// Largest TCP MSS a SYN or SYN-ACK may announce through the gateway,
    /// in either direction; 0 leaves every MSS alone.
    pub mss: u16,
    pub _pad: [u8; 2],
    pub snat_addrs: [[u8; 4]; MAX_SNAT_ADDRS],
}

impl Config {
    /// The unconfigured value: `snat_count == 0` makes the programs pass
    /// every packet, so a program loaded without settings does nothing.
    pub const UNSET: Self = Self {
        tunnel_local: [0; 4],
        port_min: 0,
        port_max: 0,
        snat_count: 0,
        max_client_flows: 0,
        mss: 0,
        _pad: [0; 2],
        snat_addrs: [[0; 4]; MAX_SNAT_ADDRS],
    };

    /// The translation address for a client. Hashing the client address
    /// keeps all of one client's flows on one address ("paired" pooling,
    /// RFC 4787 REQ-2) without any state.
    ///
    /// Rendezvous hashing: every address scores the client and the highest
    /// score wins. A pool change then moves only the clients it must, so
    /// the others' new flows stay on the address of their live ones: an
    /// address added takes about 1/n of the clients, one removed gives
    /// away only its own, and the pool's order does not matter. (Dividing
    /// a hash among the n addresses moved about half the clients.)
    #[inline(always)]
    pub fn snat_for(&self, client: [u8; 4]) -> [u8; 4] {
        let client = u64::from(u32::from_be_bytes(client)) << 32;
        let (mut best, mut best_score) = (self.snat_addrs[0], 0);
        let mut i = 0;
        while i < MAX_SNAT_ADDRS {
            if (i as u32) < self.snat_count {
                let addr = self.snat_addrs[i];
                let score = mix(client | u64::from(u32::from_be_bytes(addr)));
                if score > best_score {
                    (best, best_score) = (addr, score);
                }
            }
            i += 1;
        }
        best
    }

    /// Whether `addr` is one of our translation addresses.
    #[inline(always)]
    pub fn is_snat(&self, addr: [u8; 4]) -> bool {
        let mut i = 0;
        while i < MAX_SNAT_ADDRS {
            if (i as u32) < self.snat_count && self.snat_addrs[i] == addr {
                return true;
            }
            i += 1;
        }
        false
    }
}

/// SplitMix64's finalizer: every output bit depends on every input bit.
#[inline(always)]
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(feature = "user")]
// SAFETY: `repr(C)` of integers and byte arrays with no implicit padding.
unsafe impl aya::Pod for Config {}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(n: u32) -> Config {
        let mut c = Config::UNSET;
        c.snat_count = n;
        for (i, a) in c.snat_addrs.iter_mut().take(n as usize).enumerate() {
            *a = [10, 1, 1, 10 + i as u8];
        }
        c
    }

    #[test]
    fn one_client_always_maps_to_the_same_pool_address() {
        let c = pool(3);
        let a = c.snat_for([10, 0, 0, 7]);
        assert!(c.is_snat(a));
        for _ in 0..10 {
            assert_eq!(c.snat_for([10, 0, 0, 7]), a);
        }
    }

    #[test]
    fn clients_spread_over_the_pool() {
        let c = pool(4);
        let used: std::collections::HashSet<_> =
            (0..=255u8).map(|i| c.snat_for([10, 0, 1, i])).collect();
        assert_eq!(used.len(), 4);
    }

    /// A pool of the distinct addresses `addrs`.
    fn pool_of(addrs: &[[u8; 4]]) -> Config {
        let mut c = Config::UNSET;
        c.snat_count = addrs.len() as u32;
        c.snat_addrs[..addrs.len()].copy_from_slice(addrs);
        c
    }

    /// Up to `MAX_SNAT_ADDRS` distinct addresses.
    fn addresses(min: usize) -> impl proptest::strategy::Strategy<Value = Vec<[u8; 4]>> {
        proptest::collection::hash_set(proptest::array::uniform4(0u8..), min..=MAX_SNAT_ADDRS)
            .prop_map(|set| set.into_iter().collect())
    }

    #[test]
    fn clients_are_shared_evenly() {
        let c = pool(4);
        let mut per_addr = std::collections::HashMap::new();
        for i in 0..4096u32 {
            *per_addr
                .entry(c.snat_for((0x0a00_0000 + i).to_be_bytes()))
                .or_insert(0) += 1;
        }
        // 1024 each on average.
        assert!(
            per_addr.values().all(|&n| (900..1150).contains(&n)),
            "{per_addr:?}"
        );
    }

    use proptest::strategy::Strategy as _;

    proptest::proptest! {
        /// An address added to the pool takes some clients; every other
        /// client keeps its address (its new flows stay paired with its
        /// live ones).
        #[test]
        fn an_added_address_moves_only_the_clients_it_takes(
            addrs in addresses(2),
            clients in proptest::collection::vec(proptest::array::uniform4(0u8..), 64),
        ) {
            let (before, after) = (pool_of(&addrs[1..]), pool_of(&addrs));
            for client in clients {
                let now = after.snat_for(client);
                proptest::prop_assert!(now == before.snat_for(client) || now == addrs[0]);
            }
        }

        /// An address removed gives its clients to the others; no other
        /// client moves. And the order of the pool does not matter.
        #[test]
        fn a_removed_address_moves_only_its_own_clients(
            addrs in addresses(2),
            clients in proptest::collection::vec(proptest::array::uniform4(0u8..), 64),
        ) {
            let (before, after) = (pool_of(&addrs), pool_of(&addrs[1..]));
            let reversed: Vec<_> = addrs.iter().rev().copied().collect();
            for client in clients {
                let was = before.snat_for(client);
                proptest::prop_assert_eq!(pool_of(&reversed).snat_for(client), was);
                if was != addrs[0] {
                    proptest::prop_assert_eq!(after.snat_for(client), was);
                }
            }
        }

        /// Any client, any pool size (including an unset count): the address
        /// is one of the pool's.
        #[test]
        fn every_client_maps_into_the_pool(n in 0u32..=MAX_SNAT_ADDRS as u32 + 4, client in proptest::array::uniform4(0u8..)) {
            let c = pool(n);
            let a = c.snat_for(client);
            proptest::prop_assert!(c.is_snat(a) || n == 0);
        }
    }

    #[test]
    fn no_padding_in_global() {
        assert_eq!(core::mem::size_of::<Config>(), 20 + 4 * MAX_SNAT_ADDRS);
    }
}
