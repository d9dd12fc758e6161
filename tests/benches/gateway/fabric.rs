//! What carries the UDP rate's packets between client, gateway and server.
//!
//! In AWS that is the VPC fabric, which costs the gateway host nothing.
//! Here it is the router namespace on the same two cores as the gateway:
//! forwarding in the kernel, it does the work twice per packet (client to
//! gateway, gateway to server) and decides the figure more than the
//! gateway does. Forwarding by XDP it costs little, like the VPC, and the
//! gateways' own cost shows.

use crate::lab::{BenchLab, Kind, mac};
use anyhow::Result;
use std::os::fd::OwnedFd;
use tests::addrs::{HOST_IFACE, ROUTER_GATEWAY_IFACE, ROUTER_SERVER_IFACE};
use tests::in_netns;
use tests::tiny_bpf::{self, Hook, Program, programs};

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Fabric {
    /// The router namespace forwards with the kernel's IP stack
    /// (ip_forward), as in the tests.
    KernelRouter,
    /// The router namespace forwards by XDP: static, by ingress interface.
    Xdp,
}

impl Fabric {
    pub const ALL: [Fabric; 2] = [Fabric::KernelRouter, Fabric::Xdp];

    pub fn key(self) -> &'static str {
        match self {
            Fabric::KernelRouter => "kernel_router",
            Fabric::Xdp => "xdp_fabric",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Fabric::KernelRouter => "kernel router",
            Fabric::Xdp => "XDP fabric",
        }
    }
}

/// The router forwarding by XDP, in place of the `XDP_PASS` on its veths
/// toward client and gateway, until dropped: whatever comes from the client
/// goes to the gateway, whatever comes from the gateway to the server (the
/// UDP rate's only traffic), MAC addresses rewritten, no lookup.
pub struct XdpFabric<'a> {
    lab: &'a BenchLab,
    /// `XDP_PASS` on the kernel gateway's eth0: a veth receives redirected
    /// frames only while it runs XDP.
    _gateway_pass: Option<OwnedFd>,
}

impl<'a> XdpFabric<'a> {
    pub fn install(lab: &'a BenchLab) -> Result<Self> {
        let topo = &lab.topo;
        let gateway_pass = match lab.kind {
            Kind::Ebpf => None,
            Kind::Kernel => Some(
                Program::load(Hook::Xdp, &programs::pass())?.attach(&topo.gateway, HOST_IFACE)?,
            ),
        };
        forwarder(lab, ROUTER_GATEWAY_IFACE, &topo.gateway)?.replace(lab.router_client_xdp())?;
        forwarder(lab, ROUTER_SERVER_IFACE, &topo.server)?.replace(topo.router_gateway_xdp())?;
        Ok(Self {
            lab,
            _gateway_pass: gateway_pass,
        })
    }

    /// The router's kernel forwarding back.
    fn remove(&self) -> Result<()> {
        let pass = Program::load(Hook::Xdp, &programs::pass())?;
        pass.replace(self.lab.router_client_xdp())?;
        pass.replace(self.lab.topo.router_gateway_xdp())
    }
}

impl Drop for XdpFabric<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.remove() {
            eprintln!("bench: the router still forwards by XDP: {e:#}");
        }
    }
}

/// Sends every frame out of the router's `iface` to the eth0 at its other
/// end, in namespace `host`.
fn forwarder(lab: &BenchLab, iface: &str, host: &str) -> Result<Program> {
    let router = &lab.topo.router;
    let ifindex = in_netns(router, || tiny_bpf::ifindex(iface))??;
    let insns = programs::forward(mac(host, HOST_IFACE)?, mac(router, iface)?, ifindex);
    Program::load(Hook::Xdp, &insns)
}
