//! The running gateway: the data path loaded with a policy and attached to
//! its interface, following that interface as it changes. When the
//! interface goes away the gateway waits for it; when it comes back (a new
//! index) the programs are attached again in the same mode; when its
//! address changes and `snat` or `tunnel-local` were defaulted from it, or
//! its MTU and `mss` was, the programs are loaded again with the new value
//! (a load-time constant). The connection state lives in pinned maps
//! throughout, so flows survive all of it; the attachment is pinned too
//! and the host changes are recorded (see `links`, `host_changes`), so
//! the data path goes on after the daemon, until `egress down`.

use std::{
    net::Ipv4Addr,
    sync::{PoisonError, RwLock},
};

use anyhow::{Context as _, bail};

use crate::{
    datapath::{Attached, Datapath, Policy},
    gc::{Allowed, SharedAllowed},
    host_changes::HostChanges,
    neighbours,
    netif::Interface,
    pinning::{self, StateLock},
    settings::{Settings, mss_for_mtu},
    sysctl,
};

pub struct Gateway {
    settings: Settings,
    policy: Policy,
    /// What the sweeps let flows keep using: the policy, replaced before
    /// a data path with a new one is loaded.
    allowed: SharedAllowed,
    /// What the data path needs changed on the host, recorded in the
    /// state directory; undone by `egress down`, not by this daemon.
    changes: HostChanges,
    /// Next hops looked at (see `neighbours`), by interface index, and
    /// whether their entries are managed (marked by a gateway, recorded
    /// in `changes`) or static.
    next_hops: Vec<(u32, Ipv4Addr, bool)>,
    datapath: Datapath,
    attached: Option<Attachment>,
    // Last: the state is another daemon's to take only once this one has
    // let go of the data path.
    state_lock: StateLock,
}

/// The data path on one incarnation of the interface.
struct Attachment {
    ifindex: u32,
    hook: Attached,
}

/// What to do after looking at the interface again.
#[derive(Debug, PartialEq, Eq)]
enum Change {
    Nothing,
    /// The interface is gone.
    Gone,
    /// Attach to the interface (again), first loading the programs with
    /// the new policy if there is one.
    Attach {
        reload: Option<Policy>,
    },
}

impl Gateway {
    /// Loads the data path for `settings` and attaches it, taking over the
    /// one an earlier daemon left attached, if any.
    pub fn start(settings: Settings, reset_state: bool) -> anyhow::Result<Self> {
        // Before anything is loaded, reset or attached.
        let state_lock = pinning::claim(&settings.state_dir)?;
        let iface = Interface::find(&settings.iface)?;
        let mut policy = policy_for(&settings, &iface)?;
        policy.reset_state = reset_state;
        let datapath = Datapath::load(&policy)?;
        // Later loads pick up the state this one made.
        policy.reset_state = false;
        let allowed = SharedAllowed::new(RwLock::new(Allowed::of(&policy)));
        let changes = HostChanges::load(&policy.state_dir)?;
        let next_hops = changes
            .next_hops
            .iter()
            .map(|&(ifindex, hop)| (ifindex, hop, true))
            .collect();
        let mut gateway = Self {
            settings,
            policy,
            allowed,
            changes,
            next_hops,
            datapath,
            attached: None,
            state_lock,
        };
        let hook = gateway.attach(&iface)?;
        gateway.datapath.finish_resize();
        gateway.manage_next_hops();
        let policy = &gateway.policy;
        tracing::info!(
            iface = %iface.name,
            hook = hook.as_str(),
            tunnel_local = %policy.tunnel_local,
            snat = ?policy.snat,
            ports = %policy.ports,
            peers = ?policy.admission.peers,
            client_cidrs = ?policy.admission.client_cidrs,
            peer_clients = ?policy.admission.peer_clients,
            max_flows = policy.max_flows,
            max_client_flows = policy.max_client_flows,
            mss = policy.mss,
            "attached; gateway ready"
        );
        Ok(gateway)
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    pub fn datapath(&mut self) -> &mut Datapath {
        &mut self.datapath
    }

    pub fn allowed(&self) -> SharedAllowed {
        self.allowed.clone()
    }

    /// One line on where the gateway stands, for logs and systemd.
    pub fn status(&self) -> String {
        match &self.attached {
            Some(a) => format!("attached to {} as {}", self.settings.iface, a.hook.as_str()),
            None => format!("waiting for {} to come back", self.settings.iface),
        }
    }

    /// Readies the data path to run on without a daemon, as the daemon
    /// exits: nothing then hears of route changes, so it stops remembering
    /// FIB answers (see `Datapath::routes_unwatched`). Returns what is left
    /// behind, for the daemon's last log line.
    pub fn leave(&mut self) -> String {
        if let Err(e) = self.datapath.routes_unwatched() {
            tracing::warn!(
                "{e:#}: the data path goes on using the routes it remembers, which no daemon \
                 keeps current until the next start"
            );
        }
        let dir = self.policy.state_dir.display();
        match &self.attached {
            Some(a) => format!(
                "the data path stays attached to {} as {} and goes on translating on the state \
                 pinned in {dir}, without sweeps, metrics or relays until the next `egress run` \
                 takes it over; `egress down` removes it",
                self.settings.iface,
                a.hook.as_str()
            ),
            None => format!(
                "nothing is attached ({} is gone); the state stays pinned in {dir}; `egress \
                 down` removes what is left",
                self.settings.iface
            ),
        }
    }

    /// Looks at the interface again and follows what changed; on an
    /// error the next change tries again. A failed load or attach leaves
    /// the old programs attached (but on an interface that is gone).
    pub fn follow(&mut self) -> anyhow::Result<()> {
        let seen = Interface::lookup(&self.settings.iface)?;
        let change = plan(
            &self.settings,
            &self.policy,
            self.attached.as_ref().map(|a| a.ifindex),
            seen.as_ref(),
        );
        let Some(iface) = seen else {
            if change == Change::Gone {
                tracing::warn!(
                    iface = %self.settings.iface,
                    "the interface is gone: detached; the connection state is kept until it returns"
                );
                self.forget_attachment();
            }
            return Ok(());
        };
        let Change::Attach { reload } = change else {
            return Ok(());
        };
        if self
            .attached
            .as_ref()
            .is_some_and(|a| a.ifindex != iface.index)
        {
            self.forget_attachment();
        }
        if let Some(policy) = reload {
            tracing::info!(
                iface = %iface.name,
                tunnel_local = %policy.tunnel_local,
                snat = ?policy.snat,
                mss = policy.mss,
                "the interface's address or MTU changed: loading the data path again with it \
                 (the connection state is kept; the next sweep removes flows translated to an \
                 old address)"
            );
            // The new programs load the state pinned, and take over the
            // link pinned: the old ones'.
            self.keep_state_pinned()?;
            // Before the load: no sweep may take a flow made under the new
            // policy for one the old one left. Should the load fail, the
            // old programs go on, and so does their policy.
            let set = |to| {
                std::mem::replace(
                    &mut *self.allowed.write().unwrap_or_else(PoisonError::into_inner),
                    to,
                )
            };
            let old = set(Allowed::of(&policy));
            let hook = self.attached.as_ref().map(|a| a.hook);
            // The program that takes the old ones' place is verified as
            // part of the load, so that a refusal leaves them and their
            // policy in force; with nothing attached (the interface came
            // back), the attach loads what it needs.
            let datapath = Datapath::load(&policy)
                .and_then(|mut datapath| {
                    if let Some(hook) = hook {
                        datapath.load_program_of(hook)?;
                    }
                    Ok(datapath)
                })
                .inspect_err(|_| {
                    set(old);
                })?;
            // The old programs run on in the pinned link or filter until
            // the new ones take it over (see `links`): no packet meets the
            // host's stack in between.
            self.datapath = datapath;
            self.policy = policy;
        }
        self.attach(&iface)?;
        // As at a start: a load that found a resize's old tables left over
        // copies what they gained, then lets them go.
        self.datapath.finish_resize();
        tracing::info!(index = iface.index, "re-attached: {}", self.status());
        self.manage_next_hops();
        Ok(())
    }

    /// Keeps the pinned state the one the data path runs on: the state
    /// directory or pins in it removed or replaced by hand (meaning to start
    /// over, say) would otherwise leave a restart or reload to start with
    /// empty maps, breaking every connection (`--reset-state` is the way),
    /// the data path to detach with the daemon, and `egress down` nothing
    /// to restore. A directory made anew is taken again, unless another
    /// daemon took it.
    pub fn keep_state_pinned(&mut self) -> anyhow::Result<()> {
        let dir = &self.policy.state_dir;
        if !self.state_lock.holds(dir) {
            self.state_lock = pinning::claim(dir)?;
            tracing::warn!(dir = %dir.display(), "the state directory was removed under the running gateway: made again");
        }
        let mut pinned = self.datapath.keep_pinned(dir)?;
        if self.changes.store(dir)? {
            pinned.push("the record of its host changes");
        }
        if pinning::record_format(dir)? {
            pinned.push("the record of its state format");
        }
        if !pinned.is_empty() {
            tracing::warn!(
                dir = %dir.display(),
                pinned = ?pinned,
                "the pinned connection state was removed or replaced under the running gateway: \
                 pinned its own again, so that a restart or reload keeps its connections \
                 (--reset-state starts over)"
            );
        }
        Ok(())
    }

    /// Writes the record of host changes to the state directory.
    fn record(&self) -> anyhow::Result<()> {
        self.changes.store(&self.policy.state_dir).map(drop)
    }

    /// Marks the neighbour entries of the attached interface's next hops
    /// managed, those not marked yet, each recorded first. Best effort:
    /// without it a next hop's new MAC address is learnt only from its own
    /// ARP.
    pub fn manage_next_hops(&mut self) {
        let Some(ifindex) = self.attached.as_ref().map(|a| a.ifindex) else {
            return;
        };
        let hops = match neighbours::next_hops(ifindex, &self.policy.admission.peers) {
            Ok(hops) => hops,
            Err(e) => {
                tracing::warn!("cannot list the next hops: {e}");
                return;
            }
        };
        for hop in hops {
            if self
                .next_hops
                .iter()
                .any(|&(i, h, _)| (i, h) == (ifindex, hop))
            {
                continue;
            }
            let recorded = self.changes.next_hops.contains(&(ifindex, hop));
            if !recorded {
                self.changes.next_hops.push((ifindex, hop));
                if let Err(e) = self.record() {
                    tracing::warn!(next_hop = %hop, "{e:#}: its neighbour entry is left as it is");
                    self.changes.next_hops.retain(|&h| h != (ifindex, hop));
                    continue;
                }
            }
            match neighbours::manage(ifindex, hop) {
                Ok(marked) => {
                    if marked {
                        tracing::info!(next_hop = %hop, "the kernel keeps this next hop's neighbour entry verified (managed)");
                    } else {
                        tracing::info!(next_hop = %hop, "the next hop's neighbour entry is static: left as it is");
                    }
                    self.next_hops.push((ifindex, hop, marked));
                    if !marked && !recorded {
                        self.unrecord_hop(ifindex, hop);
                    }
                }
                Err(e) => {
                    tracing::warn!(
                        next_hop = %hop,
                        "cannot mark the next hop's neighbour entry managed: {e}; \
                         a new MAC address of it is learnt only from its own ARP"
                    );
                    if !recorded {
                        self.unrecord_hop(ifindex, hop);
                    }
                }
            }
        }
    }

    /// Takes a next hop whose entry no gateway marked out of the record.
    fn unrecord_hop(&mut self, ifindex: u32, hop: Ipv4Addr) {
        self.changes.next_hops.retain(|&h| h != (ifindex, hop));
        if let Err(e) = self.record() {
            tracing::warn!("{e:#}");
        }
    }

    /// Attaches to `iface`, setting its sysctls unless they are already
    /// set, each recorded first, as is what a clsact attach may leave.
    /// What the record holds for other interfaces, or a clsact filter no
    /// longer used, is undone once the data path runs here: it no longer
    /// runs there.
    fn attach(&mut self, iface: &Interface) -> anyhow::Result<Attached> {
        let mut added = Vec::new();
        sysctl::apply(&iface.name, iface.index, |changes| {
            let before = self.changes.sysctls.len();
            self.changes.add_sysctls(changes);
            added = self.changes.sysctls[before..].to_vec();
            self.record()
        })?;
        let (changes, dir) = (&mut self.changes, &self.policy.state_dir);
        let attached = self.datapath.attach(
            &iface.name,
            iface.index,
            self.settings.attach,
            dir,
            &mut |intent| {
                changes.attaching(intent);
                changes.store(dir).map(drop)
            },
        );
        let hook = match attached {
            Ok(hook) => hook,
            Err(e) => {
                // Not needed by a data path that is not there.
                if !added.is_empty() {
                    self.changes.sysctls.retain(|s| !added.contains(s));
                    sysctl::restore(added);
                    if let Err(e) = self.record() {
                        tracing::warn!("{e:#}");
                    }
                }
                return Err(e).with_context(|| format!("cannot attach to {}", iface.name));
            }
        };
        self.changes.attached(iface.index, self.datapath.clsact());
        self.next_hops.retain(|&(i, _, _)| i == iface.index);
        if let Err(e) = self.record() {
            tracing::warn!("{e:#}: `egress down` may not restore all of it");
        }
        self.attached = Some(Attachment {
            ifindex: iface.index,
            hook,
        });
        Ok(hook)
    }

    /// Drops the attachment to an interface that no longer exists: there
    /// is nothing to detach or restore on it.
    fn forget_attachment(&mut self) {
        if let Some(a) = self.attached.take() {
            self.changes.forget_interface(a.ifindex);
            self.next_hops.retain(|&(i, _, _)| i != a.ifindex);
            if let Err(e) = self.record() {
                tracing::warn!("{e:#}");
            }
        }
    }
}

/// Why a gateway with `settings` could not start now (see
/// [`Gateway::start`]): the interface is missing, or lacks the address or
/// MTU they default from.
pub fn cannot_start(settings: &Settings) -> Option<anyhow::Error> {
    Interface::find(&settings.iface)
        .and_then(|iface| policy_for(settings, &iface))
        .err()
}

/// The policy for `settings` on `iface`: `snat` and `tunnel-local` default
/// to its first IPv4 address, the MSS clamp to what its MTU leaves.
pub fn policy_for(settings: &Settings, iface: &Interface) -> anyhow::Result<Policy> {
    let needs_address = || {
        iface.primary.with_context(|| {
            let missing: Vec<&str> = [
                ("--snat", settings.snat.is_empty()),
                ("--tunnel-local", settings.tunnel_local.is_none()),
            ]
            .into_iter()
            .filter_map(|(flag, missing)| missing.then_some(flag))
            .collect();
            format!(
                "interface {} has no IPv4 address: give {}",
                iface.name,
                missing.join(" and ")
            )
        })
    };
    let snat = match settings.snat.is_empty() {
        true => vec![needs_address()?],
        false => settings.snat.clone(),
    };
    let mss = match (settings.mss, iface.mtu) {
        (Some(mss), _) => mss,
        (None, Some(mtu)) => mss_for_mtu(mtu),
        (None, None) => bail!("cannot read the MTU of {}: give --mss", iface.name),
    };
    Ok(Policy {
        tunnel_local: settings.tunnel_local.map_or_else(needs_address, Ok)?,
        snat,
        ports: settings.ports,
        admission: settings.admission.clone(),
        max_flows: settings.max_flows,
        max_client_flows: settings.max_client_flows,
        mss,
        state_dir: settings.state_dir.clone(),
        reset_state: false,
    })
}

/// What to do, given the policy in force, the interface index attached to
/// (if any) and the interface as seen now (if it exists).
fn plan(
    settings: &Settings,
    policy: &Policy,
    attached: Option<u32>,
    seen: Option<&Interface>,
) -> Change {
    let Some(iface) = seen else {
        return match attached {
            Some(_) => Change::Gone,
            None => Change::Nothing,
        };
    };
    // Without an address (yet: a recreated interface gets it a moment
    // later) the defaulted addresses stay what they were.
    let wanted = policy_for(settings, iface).unwrap_or_else(|_| policy.clone());
    let reload = (wanted != *policy).then_some(wanted);
    match (reload, attached == Some(iface.index)) {
        (None, true) => Change::Nothing,
        (reload, _) => Change::Attach { reload },
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::settings::for_test as settings;

    fn eth0(index: u32, primary: Option<[u8; 4]>) -> Interface {
        Interface {
            name: "eth0".into(),
            index,
            primary: primary.map(Ipv4Addr::from),
            up: true,
            mtu: Some(1500),
        }
    }

    const A: [u8; 4] = [10, 1, 1, 10];
    const B: [u8; 4] = [10, 1, 1, 20];

    #[test]
    fn an_unchanged_interface_changes_nothing() {
        let s = settings("");
        let policy = policy_for(&s, &eth0(2, Some(A))).unwrap();
        assert_eq!(
            plan(&s, &policy, Some(2), Some(&eth0(2, Some(A)))),
            Change::Nothing
        );
        // Down, or its address gone: the programs stay as they are.
        let mut down = eth0(2, None);
        down.up = false;
        assert_eq!(plan(&s, &policy, Some(2), Some(&down)), Change::Nothing);
    }

    #[test]
    fn a_vanished_interface_is_gone_once() {
        let s = settings("");
        let policy = policy_for(&s, &eth0(2, Some(A))).unwrap();
        assert_eq!(plan(&s, &policy, Some(2), None), Change::Gone);
        assert_eq!(plan(&s, &policy, None, None), Change::Nothing);
    }

    #[test]
    fn a_recreated_interface_is_attached_again() {
        let s = settings("");
        let policy = policy_for(&s, &eth0(2, Some(A))).unwrap();
        let again = Change::Attach { reload: None };
        // Back with its address, or before the address is back.
        assert_eq!(plan(&s, &policy, None, Some(&eth0(7, Some(A)))), again);
        assert_eq!(plan(&s, &policy, None, Some(&eth0(7, None))), again);
        // Replaced before the gone one was noticed.
        assert_eq!(plan(&s, &policy, Some(2), Some(&eth0(7, Some(A)))), again);
    }

    /// The policy `plan` reloads with when `seen` replaces index 2 at A.
    fn reloaded(s: &Settings, policy: &Policy, seen: &Interface) -> Policy {
        match plan(s, policy, Some(2), Some(seen)) {
            Change::Attach { reload: Some(new) } => new,
            other => panic!("expected a reload, got {other:?}"),
        }
    }

    #[test]
    fn the_mss_clamp_follows_the_mtu_unless_given() {
        let s = settings("");
        let policy = policy_for(&s, &eth0(2, Some(A))).unwrap();
        assert_eq!(policy.mss, 1440);
        let mut jumbo = eth0(2, Some(A));
        jumbo.mtu = Some(9001);
        assert_eq!(reloaded(&s, &policy, &jumbo).mss, 8941);
        let s = settings("mss = 1400");
        let policy = policy_for(&s, &eth0(2, Some(A))).unwrap();
        assert_eq!(policy.mss, 1400);
        assert_eq!(plan(&s, &policy, Some(2), Some(&jumbo)), Change::Nothing);
    }

    #[test]
    fn without_an_address_the_error_names_what_is_missing() {
        let error = |s: &str| {
            format!(
                "{:#}",
                policy_for(&settings(s), &eth0(2, None)).unwrap_err()
            )
        };
        assert!(error("").ends_with("give --snat and --tunnel-local"));
        assert!(error("snat = [\"10.1.1.10\"]").ends_with("give --tunnel-local"));
        assert!(error("tunnel-local = \"10.1.1.10\"").ends_with("give --snat"));
    }

    #[test]
    fn a_new_address_reloads_only_what_was_defaulted() {
        let s = settings("");
        let policy = policy_for(&s, &eth0(2, Some(A))).unwrap();
        let new = reloaded(&s, &policy, &eth0(2, Some(B)));
        assert_eq!(new.tunnel_local, Ipv4Addr::from(B));
        assert_eq!(new.snat, vec![Ipv4Addr::from(B)]);
        // With both given, the interface's address does not matter.
        let s = settings("snat = [\"10.1.1.10\"]\ntunnel-local = \"10.1.1.10\"");
        let policy = policy_for(&s, &eth0(2, Some(A))).unwrap();
        assert_eq!(
            plan(&s, &policy, Some(2), Some(&eth0(2, Some(B)))),
            Change::Nothing
        );
        // With only snat given, tunnel-local follows the interface.
        let s = settings("snat = [\"10.1.1.10\"]");
        let policy = policy_for(&s, &eth0(2, Some(A))).unwrap();
        let new = reloaded(&s, &policy, &eth0(2, Some(B)));
        assert_eq!(
            (new.tunnel_local, new.snat),
            (Ipv4Addr::from(B), vec![Ipv4Addr::from(A)])
        );
    }
}
