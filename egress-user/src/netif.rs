//! The interface the gateway serves, and what the kernel says about it.

use std::{ffi::CString, io, net::Ipv4Addr};

use anyhow::{Context as _, bail};

use crate::netlink::{self, Attrs, Message, Request, Socket, attr_u32};

/// `struct ifinfomsg` is 16 bytes: family, pad, type, index, flags, change.
const IFINFOMSG: usize = 16;
const IFLA_MTU: u16 = 4;
const IFLA_XDP: u16 = 43;
/// In `IFLA_XDP`: the program of each mode (native, generic, offloaded).
const IFLA_XDP_MODE_PROG_IDS: [u16; 3] = [5, 6, 7];
/// `struct rtmsg` is 12 bytes.
const RTMSG: usize = 12;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
/// The `netdev` generic-netlink family (Linux 6.3+) and its device query.
const NETDEV_CMD_DEV_GET: u8 = 1;
const NETDEV_A_DEV_IFINDEX: u16 = 1;
const NETDEV_A_DEV_XDP_FEATURES: u16 = 3;
/// `NETDEV_XDP_ACT_BASIC`: the driver runs XDP programs natively.
const XDP_ACT_BASIC: u64 = 1;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub index: u32,
    /// The first IPv4 address on the interface (on EC2, the primary private
    /// address the Internet gateway maps 1:1 to the Elastic IP).
    pub primary: Option<Ipv4Addr>,
    /// Administratively up (`ip link set NAME up`).
    pub up: bool,
    /// `None` when the kernel did not say.
    pub mtu: Option<u32>,
}

impl Interface {
    pub fn find(name: &str) -> anyhow::Result<Self> {
        match Self::lookup(name)? {
            Some(iface) => Ok(iface),
            None => bail!("interface {name:?} does not exist (see `ip link`)"),
        }
    }

    /// The interface called `name`, or `None` if there is none.
    pub fn lookup(name: &str) -> anyhow::Result<Option<Self>> {
        if name.contains('\0') {
            bail!("interface name contains a NUL byte");
        }
        let Some(index) = index_of(name) else {
            return Ok(None);
        };
        let mut primary = None;
        let mut up = false;
        for a in nix::ifaddrs::getifaddrs()
            .context("cannot list interface addresses")?
            .filter(|a| a.interface_name == name)
        {
            up |= a.flags.contains(nix::net::if_::InterfaceFlags::IFF_UP);
            if primary.is_none() {
                primary = a.address.and_then(|s| s.as_sockaddr_in().map(|s| s.ip()));
            }
        }
        Ok(Some(Self {
            name: name.to_owned(),
            index,
            primary,
            up,
            mtu: link_mtu(index).ok(),
        }))
    }

    /// Whether the driver runs XDP natively; `None` when the kernel cannot
    /// say (before Linux 6.3, which added the `netdev` family).
    pub fn native_xdp(&self) -> io::Result<Option<bool>> {
        let sock = Socket::open(libc::NETLINK_GENERIC, 0)?;
        let Some(family) = netlink::genl_family(&sock, "netdev")? else {
            return Ok(None);
        };
        let request = Request::new(family, &netlink::genl_header(NETDEV_CMD_DEV_GET, 1))
            .attr(NETDEV_A_DEV_IFINDEX, &self.index.to_ne_bytes());
        Ok(sock.request(request)?.iter().find_map(|m| {
            m.attrs(4)
                .find(|&(k, _)| k == NETDEV_A_DEV_XDP_FEATURES)
                .and_then(|(_, v)| Some(u64::from_ne_bytes(v.get(0..8)?.try_into().ok()?)))
                .map(|features| features & XDP_ACT_BASIC != 0)
        }))
    }
}

/// The MTU of interface `index`.
fn link_mtu(index: u32) -> io::Result<u32> {
    link(index)?
        .iter()
        .find_map(|m| m.attrs(IFINFOMSG).find(|&(k, _)| k == IFLA_MTU))
        .and_then(|(_, v)| attr_u32(v))
        .ok_or_else(|| io::Error::other("the kernel reported no MTU"))
}

/// The ids of the XDP programs attached to interface `index`, in any mode
/// (`ip link` shows them as `prog/xdp id N`).
pub fn xdp_programs(index: u32) -> io::Result<Vec<u32>> {
    let link = link(index)?;
    let Some((_, xdp)) = link
        .iter()
        .find_map(|m| m.attrs(IFINFOMSG).find(|&(k, _)| k == IFLA_XDP))
    else {
        return Ok(Vec::new());
    };
    Ok(Attrs::nested(xdp)
        .filter(|(k, _)| IFLA_XDP_MODE_PROG_IDS.contains(k))
        .filter_map(|(_, v)| attr_u32(v))
        .collect())
}

/// The ids of the programs on interface `index`'s TCX ingress, in the
/// order they run; none on a kernel without TCX (before 6.6). Ids only,
/// which `BPF_PROG_QUERY` gives with `CAP_NET_ADMIN`: a program's details
/// (its name) need `CAP_SYS_ADMIN`, which the unit does not grant.
pub fn tcx_programs(index: u32) -> io::Result<Vec<u32>> {
    /// `bpf(2)` command and attach type.
    const BPF_PROG_QUERY: libc::c_long = 16;
    const BPF_TCX_INGRESS: u32 = 46;
    /// `union bpf_attr`'s `query` (Linux 6.6), up to `revision`.
    #[repr(C)]
    #[derive(Default)]
    struct Query {
        target_ifindex: u32,
        attach_type: u32,
        query_flags: u32,
        attach_flags: u32,
        prog_ids: u64,
        count: u32,
        _pad: u32,
        prog_attach_flags: u64,
        link_ids: u64,
        link_attach_flags: u64,
        revision: u64,
    }
    let mut ids = [0u32; 64];
    let mut query = Query {
        target_ifindex: index,
        attach_type: BPF_TCX_INGRESS,
        prog_ids: ids.as_mut_ptr() as u64,
        count: ids.len() as u32,
        ..Query::default()
    };
    // SAFETY: `query` is a valid `bpf_attr` prefix of the size passed, and
    // `prog_ids` points to `count` writable u32s that outlive the call.
    let done = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_QUERY,
            &raw mut query,
            std::mem::size_of::<Query>(),
        )
    };
    if done < 0 {
        let e = io::Error::last_os_error();
        // A kernel without TCX knows no such attach type.
        return match e.raw_os_error() {
            Some(libc::EINVAL) => Ok(Vec::new()),
            _ => Err(e),
        };
    }
    Ok(ids[..(query.count as usize).min(ids.len())].to_vec())
}

/// The index of interface `name`, if there is one.
pub fn index_of(name: &str) -> Option<u32> {
    let name = CString::new(name).ok()?;
    // SAFETY: `name` is a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

/// What the kernel says about interface `index` (`RTM_GETLINK`).
fn link(index: u32) -> io::Result<Vec<Message>> {
    let mut ifinfomsg = [0u8; IFINFOMSG];
    ifinfomsg[4..8].copy_from_slice(&(index as i32).to_ne_bytes());
    Socket::open(libc::NETLINK_ROUTE, 0)?.request(Request::new(libc::RTM_GETLINK, &ifinfomsg))
}

/// Where the kernel routes packets to one address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    /// Index of the interface the packets leave by.
    pub oif: u32,
    /// The next hop, when not directly connected.
    pub via: Option<Ipv4Addr>,
}

/// The route to `dst` (`ip route get`), `None` if unreachable.
pub fn route_to(dst: Ipv4Addr) -> io::Result<Option<Route>> {
    let mut rtmsg = [0u8; RTMSG];
    rtmsg[0] = libc::AF_INET as u8;
    rtmsg[1] = 32;
    let request = Request::new(libc::RTM_GETROUTE, &rtmsg).attr(RTA_DST, &dst.octets());
    let answer = match Socket::open(libc::NETLINK_ROUTE, 0)?.request(request) {
        Ok(answer) => answer,
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ENETUNREACH | libc::EHOSTUNREACH)
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    Ok(answer.iter().find_map(Route::of))
}

/// Every IPv4 route with one next hop, of every table (`ip route show
/// table all`).
pub fn routes() -> io::Result<Vec<Route>> {
    let mut rtmsg = [0u8; RTMSG];
    rtmsg[0] = libc::AF_INET as u8;
    let dump = Request::new(libc::RTM_GETROUTE, &rtmsg).flags(libc::NLM_F_DUMP);
    let answer = Socket::open(libc::NETLINK_ROUTE, 0)?.request(dump)?;
    Ok(answer.iter().filter_map(Route::of).collect())
}

impl Route {
    /// The route in an `RTM_NEWROUTE` message, if it has an output
    /// interface (a multipath route has one per path, not read here).
    fn of(m: &Message) -> Option<Self> {
        let mut route = Route { oif: 0, via: None };
        for (kind, data) in m.attrs(RTMSG) {
            match kind {
                RTA_OIF => route.oif = attr_u32(data)?,
                RTA_GATEWAY => route.via = Some(<[u8; 4]>::try_from(data).ok()?.into()),
                _ => {}
            }
        }
        (route.oif != 0).then_some(route)
    }
}

/// The name of interface `index`, if it exists.
pub fn name_of(index: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `buf` has room for IF_NAMESIZE bytes, as if_indextoname needs.
    let name = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if name.is_null() {
        return None;
    }
    // SAFETY: on success `buf` holds a NUL-terminated name.
    Some(
        unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
            .to_string_lossy()
            .into_owned(),
    )
}

/// Names of every interface, for suggestions.
pub fn names() -> Vec<String> {
    let mut names: Vec<String> = nix::net::if_::if_nameindex()
        .map(|list| {
            list.iter()
                .map(|i| i.name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}
