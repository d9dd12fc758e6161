//! The test topology set up for one gateway under test: the eBPF gateway,
//! or the classic kernel NAT built from Linux's own parts.
//!
//! Either way the client sends from its inner address 192.168.250.2 over
//! eth0 (TSO and checksum offload off, so the gateway sees complete
//! packets), and the router's veth toward the client runs `XDP_PASS` so the
//! live-frames generator can transmit into it.

use crate::frames::{Ip, L4, encapsulate, ethernet, ip_packet};
use anyhow::Result;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use tests::addrs::*;
use tests::tiny_bpf::{Hook, Program, programs};
use tests::{Attach, Daemon, Topology, exec};

/// Port on the server that the UDP packet-rate traffic goes to.
const DISCARD_PORT: u16 = 9;
/// 64-byte Ethernet frames without the IP-in-IP header.
const SMALL_PAYLOAD: usize = 18;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The egress daemon's XDP program; the client encapsulates (RFC 2003)
    /// with `tiny_bpf`'s tcx encap and XDP decap, at kernel speed.
    Ebpf,
    /// ip_forward=1 + nftables masquerade + conntrack on the gateway. No
    /// ipip module here: the client sends unencapsulated, and the router
    /// steers its traffic to the gateway by policy routing.
    Kernel,
}

/// Fields drop in order: links and the daemon before the namespaces.
pub struct BenchLab {
    _links: Vec<OwnedFd>,
    /// `XDP_PASS` on the router's veth toward the client.
    router_client_xdp: OwnedFd,
    _gateway: Option<Daemon>,
    pub topo: Topology,
    pub kind: Kind,
    client_mac: [u8; 6],
    router_mac: [u8; 6],
}

impl BenchLab {
    pub fn new(kind: Kind, egress_bin: &Path) -> Result<Self> {
        let topo = Topology::new()?;
        let (client, router) = (&topo.client, &topo.router);
        exec(client, &format!("ethtool -K {HOST_IFACE} tx off tso off"))?;
        // The TUN route of the ipip-peer topology, replaced by eth0; the
        // inner MTU leaves room for the outer header in both cases alike.
        exec(
            client,
            &format!(
                "ip route replace {INTERNET_CIDR} via {ROUTER_CLIENT_IP} dev {HOST_IFACE} \
                 src {CLIENT_TUN_IP} mtu {TUN_MTU}"
            ),
        )?;
        let router_client_xdp =
            Program::load(Hook::Xdp, &programs::pass())?.attach(router, ROUTER_CLIENT_IFACE)?;
        let mut links = Vec::new();
        let gateway = match kind {
            Kind::Ebpf => {
                let encap = programs::ipip_encap(CLIENT_TUN_IP, CLIENT_UNDERLAY_IP, GATEWAY_IP);
                links.push(Program::load(Hook::TcxEgress, &encap)?.attach(client, HOST_IFACE)?);
                links.push(
                    Program::load(Hook::Xdp, &programs::ipip_decap())?
                        .attach(client, HOST_IFACE)?,
                );
                Some(topo.start_gateway(egress_bin, Attach::Native)?)
            }
            Kind::Kernel => {
                kernel_nat(&topo)?;
                None
            }
        };
        pin_neighbours(&topo)?;
        let client_mac = mac(client, HOST_IFACE)?;
        let router_mac = mac(router, ROUTER_CLIENT_IFACE)?;
        Ok(Self {
            _links: links,
            router_client_xdp,
            _gateway: gateway,
            topo,
            kind,
            client_mac,
            router_mac,
        })
    }

    /// The link running `XDP_PASS` on the router's veth toward the client,
    /// for a caller to put another program in its place.
    pub fn router_client_xdp(&self) -> BorrowedFd<'_> {
        self.router_client_xdp.as_fd()
    }

    /// A small UDP packet of flow `sport` as the client puts it on the wire
    /// toward this gateway.
    pub fn small_udp_frame(&self, sport: u16) -> Vec<u8> {
        let payload = [0u8; SMALL_PAYLOAD];
        let udp = L4::Udp {
            sport,
            dport: DISCARD_PORT,
            payload: &payload,
        };
        let inner = ip_packet(Ip::new(CLIENT_TUN_IP.octets(), SERVER_IP.octets()), udp);
        let packet = match self.kind {
            Kind::Ebpf => encapsulate(
                Ip::new(CLIENT_UNDERLAY_IP.octets(), GATEWAY_IP.octets()),
                &inner,
            ),
            Kind::Kernel => inner,
        };
        ethernet(self.client_mac, self.router_mac, &packet)
    }
}

/// The classic one-armed NAT gateway: forward, masquerade the client
/// range, no ICMP redirects (traffic leaves by the interface it came in);
/// the router sends the client's traffic there instead of straight to the
/// server, and the replies back to the client.
fn kernel_nat(topo: &Topology) -> Result<()> {
    let (router, gw) = (&topo.router, &topo.gateway);
    exec(
        router,
        &format!("ip rule add iif {ROUTER_CLIENT_IFACE} lookup 100"),
    )?;
    exec(
        router,
        &format!("ip route add default via {GATEWAY_IP} table 100"),
    )?;
    exec(
        router,
        &format!("ip route add {} via {CLIENT_UNDERLAY_IP}", CLIENT_CIDRS[0]),
    )?;
    exec(gw, "sysctl -qw net.ipv4.ip_forward=1")?;
    exec(gw, "sysctl -qw net.ipv4.conf.all.send_redirects=0")?;
    exec(
        gw,
        &format!("sysctl -qw net.ipv4.conf.{HOST_IFACE}.send_redirects=0"),
    )?;
    let ruleset = topo.lab.dir().join("nat.nft");
    std::fs::write(
        &ruleset,
        format!(
            "table ip nat {{\n  chain postrouting {{\n    type nat hook postrouting priority srcnat;\n    \
             oifname \"{HOST_IFACE}\" ip saddr {} masquerade\n  }}\n}}\n",
            CLIENT_CIDRS[0]
        ),
    )?;
    exec(gw, &format!("nft -f {}", ruleset.display()))?;
    Ok(())
}

/// Permanent neighbour entries for every hop the bench's traffic takes:
/// the UDP rate's sink drops ARP, and the XDP fabric forwards it past the
/// router, so entries that expired during the run could not be resolved
/// again and the kernel gateway's traffic would stop (the eBPF gateway's
/// FIB lookups never age an entry).
fn pin_neighbours(topo: &Topology) -> Result<()> {
    let router = &topo.router;
    let pin = |ns: &str, iface: &str, ip, lladdr: String| {
        exec(
            ns,
            &format!("ip neigh replace {ip} lladdr {lladdr} nud permanent dev {iface}"),
        )
    };
    // Each host's eth0 and the router's veth at its other end.
    for (host, host_ip, router_iface, router_ip) in [
        (
            &topo.client,
            CLIENT_UNDERLAY_IP,
            ROUTER_CLIENT_IFACE,
            ROUTER_CLIENT_IP,
        ),
        (
            &topo.gateway,
            GATEWAY_IP,
            ROUTER_GATEWAY_IFACE,
            ROUTER_GATEWAY_IP,
        ),
        (
            &topo.server,
            SERVER_IP,
            ROUTER_SERVER_IFACE,
            ROUTER_SERVER_IP,
        ),
    ] {
        pin(host, HOST_IFACE, router_ip, mac_text(router, router_iface)?)?;
        pin(router, router_iface, host_ip, mac_text(host, HOST_IFACE)?)?;
    }
    Ok(())
}

/// The MAC address of `iface` in `ns`.
pub fn mac(ns: &str, iface: &str) -> Result<[u8; 6]> {
    let text = mac_text(ns, iface)?;
    let mut mac = [0u8; 6];
    for (byte, hex) in mac.iter_mut().zip(text.split(':')) {
        *byte = u8::from_str_radix(hex, 16)?;
    }
    Ok(mac)
}

/// The MAC address of `iface` in `ns` as `ip` writes it.
fn mac_text(ns: &str, iface: &str) -> Result<String> {
    Ok(exec(ns, &format!("cat /sys/class/net/{iface}/address"))?
        .trim()
        .to_owned())
}

/// Packets `iface` in `ns` has received.
pub fn rx_packets(ns: &str, iface: &str) -> Result<u64> {
    counter(ns, iface, "rx_packets")
}

/// Packets `iface` in `ns` was given to send: sent, or dropped because
/// the ring of its veth peer was full.
pub fn tx_offered(ns: &str, iface: &str) -> Result<u64> {
    Ok(counter(ns, iface, "tx_packets")? + counter(ns, iface, "tx_dropped")?)
}

/// One of `iface`'s statistics in `ns`.
fn counter(ns: &str, iface: &str, name: &str) -> Result<u64> {
    let path = format!("/sys/class/net/{iface}/statistics/{name}");
    Ok(exec(ns, &format!("cat {path}"))?.trim().parse()?)
}
