//! The interface the gateway serves.

use std::{ffi::CString, net::Ipv4Addr};

use anyhow::{Context as _, bail};

pub struct Interface {
    pub name: String,
    pub index: u32,
    /// The first IPv4 address on the interface (on EC2, the primary private
    /// address the Internet gateway maps 1:1 to the Elastic IP).
    pub primary: Option<Ipv4Addr>,
}

impl Interface {
    pub fn find(name: &str) -> anyhow::Result<Self> {
        let cname = CString::new(name).context("interface name contains a NUL byte")?;
        // SAFETY: `cname` is a valid NUL-terminated string.
        let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        if index == 0 {
            bail!("interface {name:?} does not exist (see `ip link`)");
        }
        let primary = nix::ifaddrs::getifaddrs()
            .context("cannot list interface addresses")?
            .filter(|a| a.interface_name == name)
            .find_map(|a| a.address?.as_sockaddr_in().map(|s| s.ip()));
        Ok(Self {
            name: name.to_owned(),
            index,
            primary,
        })
    }
}
