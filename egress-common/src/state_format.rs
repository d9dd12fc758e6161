//! The format of the connection state pinned in a state directory: the
//! layout and meaning of the pinned maps' keys and values. The daemon
//! records it beside the maps, and refuses state of another format rather
//! than read its flows as garbage: sizes alone (which the loader compares)
//! do not show a reordered or reinterpreted field.

/// This version's state format. Bump it with any change of layout or
/// meaning of a pinned map's key or value (the test below lists them), and
/// teach `egress-user`'s `upgrade` to bring the previous format over, so
/// that an upgrade keeps every flow.
pub const STATE_FORMAT: u32 = 1;

/// The format of state that has no record: the versions before the record
/// wrote none.
pub const UNRECORDED_FORMAT: u32 = 1;

#[cfg(test)]
mod tests {
    use core::mem::{offset_of, size_of};

    use super::STATE_FORMAT;
    use crate::{
        flow::{Flow, FlowKey, Mapping, PortKey},
        flow_cache::CachedFlow,
        fragment::{FragEntry, FragKey, HeldFragment},
        reason::Reason,
    };

    /// A type's name, size and the offset of each of its fields.
    macro_rules! layout {
        ($t:ident: $($field:ident),+) => {
            (stringify!($t), size_of::<$t>(), vec![$(offset_of!($t, $field)),+])
        };
    }

    /// Fails on a change to a pinned type's layout: if it is one, bump
    /// [`STATE_FORMAT`] (and bring the old format over in `upgrade`), then
    /// write the new layout here. (A field renamed fails to compile here:
    /// see whether its meaning changed.)
    #[test]
    fn pinned_layouts_are_those_of_this_state_format() {
        assert_eq!(STATE_FORMAT, 1, "write the new format's layouts below");
        let layouts = [
            layout!(FlowKey: src, dst, sport, dport, proto, dir),
            layout!(Flow: client_addr, nat_addr, remote_addr, peer_addr, client_port, nat_port,
                remote_port, proto, tcp_flags, created_ns, last_seen_ns, packets, bytes,
                handshake_ns, rtt_ns),
            layout!(PortKey: addr, port, proto, dir),
            layout!(Mapping: addr, port, used_ns),
            layout!(CachedFlow: flow, key, tick, packets, bytes),
            layout!(FragKey: src, dst, id, proto, dir),
            layout!(FragEntry: flow, first_ns),
            layout!(HeldFragment: tunnel_local, len, packet),
        ];
        let format_1 = [
            ("FlowKey", 16, vec![0, 4, 8, 10, 12, 13]),
            (
                "Flow",
                72,
                vec![0, 4, 8, 12, 16, 18, 20, 22, 23, 24, 32, 40, 48, 56, 64],
            ),
            ("PortKey", 8, vec![0, 4, 6, 7]),
            ("Mapping", 16, vec![0, 4, 8]),
            ("CachedFlow", 112, vec![0, 72, 88, 96, 104]),
            ("FragKey", 12, vec![0, 4, 8, 10, 11]),
            ("FragEntry", 24, vec![0, 16]),
            ("HeldFragment", 1508, vec![0, 4, 8]),
        ];
        assert_eq!(layouts, format_1);
    }

    /// The `STATS` counters are indexed by reason: new reasons are appended,
    /// and the ones of this format keep their places.
    #[test]
    fn counted_reasons_keep_their_places() {
        let format_1 = [
            "translated",
            "new_flow",
            "reverse_hit",
            "no_neighbour",
            "not_ipv4",
            "not_ours",
            "truncated",
            "peer_not_allowed",
            "client_not_allowed",
            "loop",
            "bad_length",
            "bad_outer",
            "inner_not_ipv4",
            "inner_options",
            "fragment_unmatched",
            "unsupported",
            "ttl_exceeded",
            "ports_exhausted",
            "table_full",
            "client_limit",
            "no_route",
            "not_forwarded",
            "too_big",
            "internal",
            "icmp_error_relayed",
            "kernel_fragments",
            "bad_checksum",
            "nested_tunnel",
            "bad_header",
            "icmp_error_no_flow",
            "peer_moved",
            "fragment_ahead",
        ];
        let names: Vec<_> = Reason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(names[..format_1.len()], format_1);
    }
}
