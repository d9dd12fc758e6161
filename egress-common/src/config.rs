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
    #[inline(always)]
    pub fn snat_for(&self, client: [u8; 4]) -> [u8; 4] {
        let n = self.snat_count.clamp(1, MAX_SNAT_ADDRS as u32);
        let h = u32::from_be_bytes(client).wrapping_mul(0x9e37_79b1);
        // Multiply-shift maps h onto [0, n) without a division, in a form
        // whose bounds the verifier can follow.
        self.snat_addrs[((u64::from(h) * u64::from(n)) >> 32) as usize]
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

    proptest::proptest! {
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
