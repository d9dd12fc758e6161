//! `egress down`: removes the gateway. The daemon leaves its data path
//! attached and translating when it exits (see `links`); this detaches it
//! (the XDP or TCX link pinned in the state directory, or the clsact
//! filter) and undoes what the gateway changed on the host, as recorded
//! (see `host_changes`). The connection state stays pinned, for a later
//! `egress run` to resume, unless it is to go too.

use std::path::Path;

use crate::{
    clsact::{self, ClsactRecord},
    datapath::TC_PROGRAM,
    host_changes::HostChanges,
    links, netif, pinning,
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
    let mut changes = HostChanges::load(dir)?;
    let found = !links.is_empty() || changes.clsact.is_some();
    for link in links {
        link.detach()?;
    }
    // Our filter a daemon attached on the settings' interface but did not
    // live to record (or one of a version before the record), unless a
    // running gateway's (another state directory's).
    if let Some(index) = iface.and_then(netif::index_of)
        && changes.clsact.is_none_or(|c| c.ifindex != index)
        && clsact::running_gateway(index, TC_PROGRAM)?.is_none()
    {
        ClsactRecord {
            ifindex: index,
            added: false,
        }
        .undo(TC_PROGRAM);
    }
    let restored = !changes.is_empty();
    changes.undo();
    HostChanges::unpin(dir)?;
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
    match (found, restored) {
        (false, false) => println!("nothing attached: the gateway is down; {state}"),
        _ => println!(
            "gateway down: its data path is detached{}; {state}",
            if restored {
                ", and the host settings it changed are restored"
            } else {
                ""
            }
        ),
    }
    Ok(())
}
