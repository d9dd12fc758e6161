//! Every address and name of the topology, in one place.

use std::net::Ipv4Addr;

/// Prefix length of the three router links.
pub const LINK_PREFIX: u8 = 24;
/// Name of each host's (gateway, client, server) veth toward the router.
pub const HOST_IFACE: &str = "eth0";

/// The gateway's private address: AWS maps it 1:1 to the Elastic IP, so it is
/// also the SNAT address.
pub const GATEWAY_IP: Ipv4Addr = Ipv4Addr::new(10, 1, 1, 10);
pub const ROUTER_GATEWAY_IP: Ipv4Addr = Ipv4Addr::new(10, 1, 1, 1);
pub const ROUTER_CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 1);
pub const ROUTER_SERVER_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
/// Router-side veth names, toward gateway, client and server.
pub const ROUTER_GATEWAY_IFACE: &str = "to-gw";
pub const ROUTER_CLIENT_IFACE: &str = "to-client";
pub const ROUTER_SERVER_IFACE: &str = "to-server";

/// The client host's underlay address: the tunnel endpoint the gateway peers with.
pub const CLIENT_UNDERLAY_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 10);
pub const TUN_IFACE: &str = "tun0";
/// 1500-byte underlay minus the 20-byte outer header.
pub const TUN_MTU: u32 = 1480;
/// Inner addresses the client sends from (none is an underlay address).
pub const CLIENT_TUN_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 250, 2);
pub const CLIENT_TUN_PREFIX: u8 = 30;
pub const CLIENT_EXTRA_IPS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(10, 0, 2, 2),
    Ipv4Addr::new(10, 0, 2, 3),
    Ipv4Addr::new(10, 0, 2, 4),
];
/// What the gateway accepts as inner sources (`--client-cidr`).
pub const CLIENT_CIDRS: [&str; 2] = ["192.168.250.0/30", "10.0.0.0/16"];

/// The "Internet", reached from the client only through the tunnel.
pub const INTERNET_CIDR: &str = "203.0.113.0/24";
pub const SERVER_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
pub const HTTP_PORT: u16 = 8080;
