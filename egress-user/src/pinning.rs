//! Where connection state outlives the daemon: maps pinned in a bpffs
//! directory, which a restarted (or upgraded) daemon picks up again.

use std::{fs, io, path::Path};

use anyhow::{Context as _, bail};
use aya::maps::{Array, Map, MapData, MapError};
use egress_common::state_format::STATE_FORMAT;
use nix::{
    fcntl::{Flock, FlockArg},
    mount::MsFlags,
    sys::statfs,
};

use crate::resize;

/// The default state directory.
pub const DEFAULT_STATE_DIR: &str = "/sys/fs/bpf/egress";
/// Where the BPF filesystem lives when the host has one.
pub const BPFFS: &str = "/sys/fs/bpf";
/// The maps the data path pins (the `#[map]`s declared `pinned`).
pub const PINNED_MAPS: [&str; 8] = [
    "FLOWS",
    "MAPPINGS",
    "CLIENT_FLOWS",
    "STATS",
    "FLOW_CACHE",
    "FRAGMENTS",
    "HELD_FRAGMENTS",
    "IP_IDS",
];
/// The one-entry map that records the state's format (see
/// `egress_common::state_format`).
pub const FORMAT: &str = "STATE_FORMAT";
/// The maps every version that pinned state at all has pinned: one of
/// them missing beside others was removed.
pub const ALWAYS_PINNED: [&str; 4] = ["FLOWS", "MAPPINGS", "CLIENT_FLOWS", "STATS"];

/// A daemon's sole use of a state directory: an exclusive `flock` on it,
/// which the kernel releases when the process ends, however it ends. Two
/// daemons on one state would translate over each other's flows, and one
/// started with `--reset-state` would wipe the other's.
pub struct StateLock {
    lock: Flock<fs::File>,
}

/// Prepares `dir` (see [`prepare`]) and takes it for this daemon, or says
/// who has it.
pub fn claim(dir: &Path) -> anyhow::Result<StateLock> {
    prepare(dir, false)?;
    match lock(dir, FlockArg::LockExclusiveNonblock)? {
        Some(lock) => Ok(lock),
        None => bail!(
            "another `egress run` is using the state in {}: stop it first (systemctl stop \
             egress), or give this one its own --state-dir",
            dir.display()
        ),
    }
}

/// Takes `dir`, which exists, for `egress down`: no daemon may start on
/// it meanwhile. Refuses while one runs on it.
pub fn claim_for_down(dir: &Path) -> anyhow::Result<StateLock> {
    match lock(dir, FlockArg::LockExclusiveNonblock)? {
        Some(lock) => Ok(lock),
        None => bail!(
            "a gateway (`egress run`) is running on the state in {}: it would attach again \
             whatever `egress down` removed; stop it first (systemctl stop egress; the data \
             path stays attached), then run `egress down` again",
            dir.display()
        ),
    }
}

/// Whether a daemon holds `dir` now, without keeping it from one: a
/// shared lock, let go at once, is refused while one holds it. `None`
/// if `dir` cannot be looked at.
pub fn held(dir: &Path) -> Option<bool> {
    lock(dir, FlockArg::LockSharedNonblock)
        .ok()
        .map(|lock| lock.is_none())
}

/// `dir` locked as `how` asks; `None` if another process holds it.
fn lock(dir: &Path, how: FlockArg) -> anyhow::Result<Option<StateLock>> {
    let file = fs::File::open(dir).with_context(|| format!("cannot open {}", dir.display()))?;
    match Flock::lock(file, how) {
        Ok(lock) => Ok(Some(StateLock { lock })),
        Err((_, nix::Error::EWOULDBLOCK)) => Ok(None),
        Err((_, e)) => Err(e).with_context(|| format!("cannot lock {}", dir.display())),
    }
}

impl StateLock {
    /// Whether `dir` is the directory this lock holds, not one made anew
    /// since that was removed (or nothing now).
    pub fn holds(&self, dir: &Path) -> bool {
        let (Ok(locked), Ok(now)) = (
            nix::sys::stat::fstat(&*self.lock),
            nix::sys::stat::stat(dir),
        ) else {
            return false;
        };
        (locked.st_dev, locked.st_ino) == (now.st_dev, now.st_ino)
    }
}

/// Where a state directory lies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// On a BPF filesystem, or below a directory that is.
    OnBpffs,
    /// Under /sys/fs/bpf, where no BPF filesystem is mounted yet: the
    /// daemon mounts it, as systemd does at boot.
    Mountable,
    /// Elsewhere: no place for pins.
    Elsewhere,
}

/// `dir`, or where it would be made: its nearest existing ancestor.
fn nearest_existing(dir: &Path) -> &Path {
    dir.ancestors()
        .find(|a| !a.as_os_str().is_empty() && a.exists())
        .unwrap_or(Path::new("."))
}

/// Where `dir` lies, judged by its nearest existing ancestor (itself, if
/// it exists): the directories below it are made on the same filesystem.
pub fn placement(dir: &Path) -> anyhow::Result<Placement> {
    let existing = nearest_existing(dir);
    Ok(if on_bpffs(existing)? {
        Placement::OnBpffs
    } else if dir.starts_with(BPFFS) {
        Placement::Mountable
    } else {
        Placement::Elsewhere
    })
}

/// Whether this process may pin in `dir` (or make it): not so on a
/// read-only mount, as a unit's `ProtectSystem=strict` makes every one
/// outside /dev, /proc and /sys.
pub fn writable(dir: &Path) -> nix::Result<()> {
    nix::unistd::access(nearest_existing(dir), nix::unistd::AccessFlags::W_OK)
}

/// Makes `dir` ready to hold pinned maps: on a BPF filesystem (mounting
/// one on /sys/fs/bpf if `dir` is under it and the host has none) and,
/// with `reset`, emptied of the state a previous run left there (the
/// directory itself stays: a running daemon holds it, see [`claim`]).
pub fn prepare(dir: &Path, reset: bool) -> anyhow::Result<()> {
    match placement(dir)? {
        Placement::OnBpffs => {}
        Placement::Mountable => {
            nix::mount::mount(
                Some("bpf"),
                BPFFS,
                Some("bpf"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                None::<&str>,
            )
            .with_context(|| format!("cannot mount the BPF filesystem on {BPFFS}"))?;
            tracing::info!("mounted the BPF filesystem on {BPFFS}");
        }
        Placement::Elsewhere => bail!(
            "state directory {} is not on a BPF filesystem: {}",
            dir.display(),
            elsewhere_fix(dir)
        ),
    }
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    if reset {
        remove(dir)?;
    }
    Ok(())
}

/// What to do about a state directory that is not on a BPF filesystem.
pub fn elsewhere_fix(dir: &Path) -> String {
    let dir = dir.display();
    format!(
        "set state-dir under {BPFFS}, or mount one on it first \
         (mkdir -p {dir} && mount -t bpf bpf {dir})"
    )
}

/// Removes the pin at `path`, if there is one; returns whether there was.
pub fn unpin(path: &Path) -> anyhow::Result<bool> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("cannot remove {}", path.display())),
    }
}

/// Removes the pinned connection state in `dir` (an interrupted resize's
/// pins too).
pub fn remove(dir: &Path) -> anyhow::Result<()> {
    let mut removed = resize::discard(dir)?;
    for name in PINNED_MAPS.iter().chain([&FORMAT]) {
        removed += usize::from(unpin(&dir.join(name))?);
    }
    if removed > 0 {
        tracing::info!(dir = %dir.display(), "removed the previous run's connection state");
    }
    Ok(())
}

/// The format of the state in `dir` as recorded there; `None` if there
/// is no record: no state, or state of the versions before the record
/// (`UNRECORDED_FORMAT`).
pub fn recorded_format(dir: &Path) -> anyhow::Result<Option<u32>> {
    let path = dir.join(FORMAT);
    let context = || format!("cannot read {}", path.display());
    let map = match MapData::from_pin(&path) {
        Ok(map) => map,
        Err(MapError::SyscallError(e)) if e.io_error.kind() == io::ErrorKind::NotFound => {
            return Ok(None);
        }
        Err(e) => return Err(e).with_context(context),
    };
    let array: Array<_, u32> = Array::try_from(Map::from_map_data(map)?).with_context(context)?;
    array.get(&0, 0).map(Some).with_context(context)
}

/// Records this version's state format in `dir`, unless it is recorded
/// already; returns whether it pinned the record.
pub fn record_format(dir: &Path) -> anyhow::Result<bool> {
    if recorded_format(dir)? == Some(STATE_FORMAT) {
        return Ok(false);
    }
    let path = dir.join(FORMAT);
    let context = || format!("cannot record the state format in {}", path.display());
    unpin(&path)?;
    let mut array = Array::<MapData, u32>::create(1, 0).with_context(context)?;
    array.set(0, &STATE_FORMAT, 0).with_context(context)?;
    array.pin(&path).with_context(context)?;
    Ok(true)
}

/// Whether pinned state from an earlier run is present in `dir`.
pub fn has_state(dir: &Path) -> bool {
    dir.join(PINNED_MAPS[0]).exists()
}

pub fn on_bpffs(path: &Path) -> anyhow::Result<bool> {
    match statfs::statfs(path) {
        Ok(fs) => Ok(fs.filesystem_type() == statfs::BPF_FS_MAGIC),
        Err(nix::Error::ENOENT) => Ok(false),
        Err(e) => Err(e).with_context(|| format!("cannot stat {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_dir_is_judged_by_its_nearest_existing_ancestor() {
        // Whether or not this host has a BPF filesystem mounted there: the
        // mount point itself, and a nested directory not made yet, are
        // where the daemon keeps (or mounts) one, not "elsewhere".
        let root = placement(Path::new(BPFFS)).unwrap();
        assert_ne!(root, Placement::Elsewhere);
        let nested = placement(&Path::new(BPFFS).join("egress/gw1/not-made-yet")).unwrap();
        assert_eq!(nested, root);
        let tmp = std::env::temp_dir().join("egress-no-such-dir/state");
        assert_eq!(placement(&tmp).unwrap(), Placement::Elsewhere);
    }
}
