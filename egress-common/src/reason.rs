//! Why a packet got its verdict: the index into the per-CPU `STATS` counters.
//! Every packet the programs see increments exactly one of these.

/// What happened to the packet, grouped by verdict.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    // Fast path.
    /// Outbound: decapsulated, translated and forwarded (existing flow).
    Translated,
    /// Outbound: as `Translated`, and this packet created the flow.
    NewFlow,
    /// Return: reverse-translated, encapsulated and sent to the peer.
    ReverseHit,
    /// Translated, but the kernel has no neighbour entry for the next hop
    /// yet: handed to the kernel's forwarding path, which resolves it.
    NoNeighbour,

    // Passed to the kernel untouched.
    /// Not IPv4 (ARP, IPv6, VLAN, ...).
    NotIpv4,
    /// IPv4 that is neither tunnel traffic for us nor a reply to a flow.
    NotOurs,

    // Dropped.
    /// Frame shorter than the headers it claims.
    Truncated,
    /// IP-in-IP from an address not configured as a peer.
    PeerNotAllowed,
    /// Inner source outside every client CIDR (no open proxy), or outside
    /// the sending peer's own ranges (`peer-clients`).
    ClientNotAllowed,
    /// Inner source is one of the gateway's own addresses (tunnel loop).
    Loop,
    /// Length fields disagree with each other or the frame: an IP total
    /// length beyond the frame or short of its headers, outer and inner
    /// lengths that do not match, a UDP length or TCP header length that
    /// does not fit the IP packet.
    BadLength,
    /// Outer header with options or fragmented: not a valid RFC 2003
    /// packet; or marked CE over an inner packet that is not ECN-capable,
    /// which cannot carry the mark on (RFC 6040).
    BadOuter,
    /// Encapsulated payload is not IPv4.
    InnerNotIpv4,
    /// Inner header carries IP options.
    InnerOptions,
    /// Return: a later (non-first) fragment whose datagram's first
    /// fragment has not been seen (it is still on the way, or the datagram
    /// is the host's own): passed to the kernel, with a copy for the daemon,
    /// which sends it to its client once the first fragment has passed.
    /// (This slot counted outbound later fragments without their first
    /// while those were dropped, and every inner fragment before fragments
    /// were translated.)
    FragmentUnmatched,
    /// Inner protocol or ICMP type the gateway does not translate.
    Unsupported,
    /// TTL would reach zero at this hop: answered with ICMP time exceeded
    /// (rate limited) unless the packet is itself an ICMP error.
    TtlExceeded,
    /// No free translation port after every try.
    PortsExhausted,
    /// The flow table is full.
    TableFull,
    /// The client already has its configured maximum of flows (RFC 6888 REQ-4).
    ClientLimit,
    /// No route, or a blackhole/unreachable/prohibit route.
    NoRoute,
    /// Forwarding is disabled on the interface, or the route is local.
    NotForwarded,
    /// The packet does not fit the next hop's MTU and has DF set: answered
    /// with ICMP fragmentation needed (rate limited) unless it is itself an
    /// ICMP error.
    TooBig,
    /// A kernel helper failed (head adjustment, redirect).
    Internal,
    /// An ICMP error about a translated flow, translated and sent on (RFC
    /// 5508): from the Internet back to the client through the tunnel, or
    /// from a client (about the flow's return traffic) to the remote host.
    IcmpErrorRelayed,
    /// Translated, but larger than the next hop's MTU and without DF:
    /// handed to the kernel's forwarding path, which fragments it.
    KernelFragments,
    /// An IPv4 header (outer, inner or return) whose checksum is wrong: the
    /// kernel would drop it too. Or an ICMP error about a flow whose ICMP
    /// checksum is wrong (RFC 5508 REQ-3). Other transport checksums are
    /// not verified.
    BadChecksum,
    /// The inner packet is itself IP-in-IP: one level of tunnel is all the
    /// gateway decapsulates.
    NestedTunnel,
    /// Not an IPv4 header although one is due: version other than 4, or a
    /// header length (IHL) below 5 words. The kernel drops these too.
    BadHeader,
    /// Outbound: an ICMP error from a client whose quoted packet is no
    /// return packet of a flow the error's peer owns; never forwarded.
    IcmpErrorNoFlow,
    /// Outbound: as `Translated`, through another peer than the flow's
    /// (its tunnel failed over): the flow and its replies move to it.
    PeerMoved,
    /// Outbound: a later fragment whose datagram's first fragment the
    /// gateway has not seen (it is still on the way, came through another
    /// peer, or its flow has gone): translated by address alone, as every
    /// client has one translation address, and counted in no flow.
    FragmentAhead,
}

impl Reason {
    pub const COUNT: u32 = Reason::FragmentAhead as u32 + 1;

    /// Size of the pinned counter array: room for reasons added later, so
    /// an upgrade keeps its counters. New reasons are appended, never
    /// inserted, for the same reason.
    pub const SLOTS: u32 = 64;

    pub const ALL: [Reason; Reason::COUNT as usize] = [
        Reason::Translated,
        Reason::NewFlow,
        Reason::ReverseHit,
        Reason::NoNeighbour,
        Reason::NotIpv4,
        Reason::NotOurs,
        Reason::Truncated,
        Reason::PeerNotAllowed,
        Reason::ClientNotAllowed,
        Reason::Loop,
        Reason::BadLength,
        Reason::BadOuter,
        Reason::InnerNotIpv4,
        Reason::InnerOptions,
        Reason::FragmentUnmatched,
        Reason::Unsupported,
        Reason::TtlExceeded,
        Reason::PortsExhausted,
        Reason::TableFull,
        Reason::ClientLimit,
        Reason::NoRoute,
        Reason::NotForwarded,
        Reason::TooBig,
        Reason::Internal,
        Reason::IcmpErrorRelayed,
        Reason::KernelFragments,
        Reason::BadChecksum,
        Reason::NestedTunnel,
        Reason::BadHeader,
        Reason::IcmpErrorNoFlow,
        Reason::PeerMoved,
        Reason::FragmentAhead,
    ];

    /// Stable snake_case name, used in logs and metric labels.
    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::Translated => "translated",
            Reason::NewFlow => "new_flow",
            Reason::ReverseHit => "reverse_hit",
            Reason::NoNeighbour => "no_neighbour",
            Reason::NotIpv4 => "not_ipv4",
            Reason::NotOurs => "not_ours",
            Reason::Truncated => "truncated",
            Reason::PeerNotAllowed => "peer_not_allowed",
            Reason::ClientNotAllowed => "client_not_allowed",
            Reason::Loop => "loop",
            Reason::BadLength => "bad_length",
            Reason::BadOuter => "bad_outer",
            Reason::InnerNotIpv4 => "inner_not_ipv4",
            Reason::InnerOptions => "inner_options",
            Reason::FragmentUnmatched => "fragment_unmatched",
            Reason::Unsupported => "unsupported",
            Reason::TtlExceeded => "ttl_exceeded",
            Reason::PortsExhausted => "ports_exhausted",
            Reason::TableFull => "table_full",
            Reason::ClientLimit => "client_limit",
            Reason::NoRoute => "no_route",
            Reason::NotForwarded => "not_forwarded",
            Reason::TooBig => "too_big",
            Reason::Internal => "internal",
            Reason::IcmpErrorRelayed => "icmp_error_relayed",
            Reason::KernelFragments => "kernel_fragments",
            Reason::BadChecksum => "bad_checksum",
            Reason::NestedTunnel => "nested_tunnel",
            Reason::BadHeader => "bad_header",
            Reason::IcmpErrorNoFlow => "icmp_error_no_flow",
            Reason::PeerMoved => "peer_moved",
            Reason::FragmentAhead => "fragment_ahead",
        }
    }

    /// What the data path did with a packet counted under this reason.
    pub const fn verdict(self) -> Verdict {
        match self {
            Reason::Translated
            | Reason::NewFlow
            | Reason::ReverseHit
            | Reason::IcmpErrorRelayed
            | Reason::PeerMoved
            | Reason::FragmentAhead => Verdict::Forwarded,
            Reason::NoNeighbour
            | Reason::NotIpv4
            | Reason::NotOurs
            | Reason::KernelFragments
            | Reason::FragmentUnmatched => Verdict::Passed,
            _ => Verdict::Dropped,
        }
    }
}

const _: () = assert!(Reason::COUNT <= Reason::SLOTS);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Forwarded,
    Passed,
    Dropped,
}

impl Verdict {
    pub const fn as_str(self) -> &'static str {
        match self {
            Verdict::Forwarded => "forwarded",
            Verdict::Passed => "passed",
            Verdict::Dropped => "dropped",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_lists_every_reason_in_index_order() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{}", r.as_str());
        }
        let names: std::collections::HashSet<_> = Reason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(names.len(), Reason::ALL.len());
    }

    /// Operators read the counters' names in `egress stats` and the
    /// metrics, and look them up in the README.
    #[test]
    fn the_readme_names_every_reason() {
        let readme = include_str!("../../README.md");
        for r in Reason::ALL {
            let name = format!("`{}`", r.as_str());
            assert!(readme.contains(&name), "README.md never names {name}");
        }
    }
}
