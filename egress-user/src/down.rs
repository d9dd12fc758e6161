//! `egress down`: removes the gateway. The daemon leaves its data path
//! attached and translating when it exits (see `links`); this detaches it
//! (the XDP or TCX link pinned in the state directory, or the clsact
//! filter) and undoes what the gateway changed on the host, as recorded
//! (see `host_changes`). The connection state stays pinned, for a later
//! `egress run` to resume, unless it is to go too.
//!
//! A record it cannot read does not keep the data path attached: it is
//! detached all the same, and `egress down` fails naming what it could
//! not restore. A link it cannot detach stops it before it restores
//! anything: the host settings stay while the data path runs on them.

use std::path::Path;

use crate::{
    clsact::{self, ClsactRecord},
    datapath::TC_PROGRAM,
    host_changes::{self, HostChanges},
    links, netif, pinning, sysctl,
};

/// Takes down the gateway whose state is in `dir` (on interface `iface`,
/// if the settings name one); with `reset_state`, its connection state
/// too. Refused while a daemon runs on `dir`; nothing to take down is no
/// error.
pub fn down(dir: &Path, iface: Option<&str>, reset_state: bool) -> anyhow::Result<()> {
    if !dir.is_dir() {
        println!(
            "nothing attached: no state directory {} (the gateway is down)",
            dir.display()
        );
        return Ok(());
    }
    let _lock = pinning::claim_for_down(dir)?;
    let links = links::pinned(dir)?;
    let (mut changes, unreadable) = match HostChanges::load(dir) {
        Ok(changes) => (changes, None),
        Err(e) => (HostChanges::default(), Some(e)),
    };
    let mut done = Vec::new();
    if !links.is_empty() || changes.clsact.is_some() || !changes.clsact_attaching.is_empty() {
        done.push("its data path is detached".to_owned());
    }
    for link in links {
        link.detach()?;
    }
    // Our filter a daemon attached on the settings' interface but did not
    // live to record (or one of a version before the record, or the
    // record unreadable), unless a running gateway's (another state
    // directory's).
    let unrecorded = iface
        .and_then(|name| Some((name, netif::index_of(name)?)))
        .filter(|&(_, index)| !changes.has_clsact_on(index));
    if let Some((name, index)) = unrecorded
        && clsact::running_gateway(index, TC_PROGRAM)?.is_none()
    {
        let filter = ClsactRecord {
            ifindex: index,
            added: false,
        };
        if filter.undo(TC_PROGRAM) {
            done.push(format!(
                "the {TC_PROGRAM} filter a gateway left unrecorded on {name}'s clsact ingress \
                 is removed"
            ));
        }
    }
    if !changes.is_empty() {
        done.push("the host settings it changed are restored".to_owned());
    }
    changes.undo();
    if unreadable.is_none() {
        HostChanges::unpin(dir)?;
    }
    let state = if reset_state {
        pinning::remove(dir)?;
        // Emptied: gone, as after a reboot (a pin of another tool's keeps it).
        let _ = std::fs::remove_dir(dir);
        format!("its connection state in {} is removed", dir.display())
    } else if pinning::has_state(dir) {
        format!(
            "its connection state stays in {} (an `egress run` resumes it; `egress down \
             --reset-state` removes it)",
            dir.display()
        )
    } else {
        "it left no connection state".to_owned()
    };
    println!("{}", summary(&done, &state));
    match unreadable {
        None => Ok(()),
        Some(e) => Err(anyhow::anyhow!(
            "{}",
            not_restored(&dir.join(host_changes::PIN), iface, &format!("{e:#}"))
        )),
    }
}

/// The line `egress down` ends with: what it did (`done`), and what
/// became of the connection state.
fn summary(done: &[String], state: &str) -> String {
    match done {
        [] => format!("nothing attached: the gateway is down; {state}"),
        [one] => format!("gateway down: {one}; {state}"),
        [first @ .., last] => format!("gateway down: {}, and {last}; {state}", first.join(", ")),
    }
}

/// What `egress down` could not restore without the record at `record`
/// (unreadable: `why`), how to look at it, and what to do with the record.
fn not_restored(record: &Path, iface: Option<&str>, why: &str) -> String {
    let iface = iface.unwrap_or("IFACE");
    let sysctls = sysctl::NEEDED
        .map(|(key, _)| sysctl::conf_dir(iface).join(key).display().to_string())
        .join(" and ");
    format!(
        "the host settings the gateway changed are not restored ({why}): {sysctls} stay as \
         it set them (`sysctl net.ipv4.conf.{iface}` shows them), the neighbour entries of \
         its next hops stay managed (`ip neigh show dev {iface}`), and a clsact qdisc it \
         may have added stays (`tc qdisc show dev {iface}`); restore them by hand, then \
         remove the record (rm {record}), or run the egress version that wrote it (an \
         `egress run` refuses it too)",
        record = record.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreadable_record_names_what_stays_and_where() {
        let text = not_restored(
            Path::new("/sys/fs/bpf/egress/HOST_CHANGES"),
            Some("eth0"),
            "cannot read /sys/fs/bpf/egress/HOST_CHANGES: EINVAL",
        );
        for words in [
            "not restored (cannot read /sys/fs/bpf/egress/HOST_CHANGES: EINVAL)",
            "/proc/sys/net/ipv4/conf/eth0/forwarding and /proc/sys/net/ipv4/conf/eth0/accept_local",
            "ip neigh show dev eth0",
            "tc qdisc show dev eth0",
            "rm /sys/fs/bpf/egress/HOST_CHANGES",
        ] {
            assert!(text.contains(words), "{words:?} not in {text}");
        }
    }
}
