//! Connection state pinned with another `max-flows` than the one
//! configured, brought to the configured size at start (or on a reload's
//! new image), so that a change of `max-flows` keeps every flow.
//!
//! The maps sized from `max-flows` (flows, mappings, per-client counts)
//! are made anew with the configured size, the same type and flags, and
//! every entry is copied over in bulk. Then they take the old ones' pins,
//! where the loader picks them up. A previous data path may still run on
//! the old maps until the new programs take its place (a reload's, or one
//! left attached): what it adds meanwhile is copied after the copy
//! ([`Pending::catch_up`]) and once more after the attach
//! ([`Pending::finish`]), which then lets the old maps go. What it changes
//! in entries copied before (a FIN, the last packet's time, a mapping's
//! use, a client's count) is carried over too, as `carry_over` rules.
//!
//! Against a crash part way, the pins change in steps that each leave a
//! state the next start can finish: the new maps are pinned under
//! temporary names (`resize-new-NAME`), the old ones a second time
//! (`resize-old-NAME-ID`), and `rename(2)` moves each new pin over the old
//! one. At the next start a `resize-new-` pin (never moved) goes, and so
//! does a `resize-old-` pin of the map still pinned as `NAME` (not
//! replaced); one of a replaced map is an old map whose entries are
//! caught up, as above; until then `egress check` names them
//! ([`remnants`]). (Dots, which bpffs reserves, are left out.)

use std::{
    fmt::Write as _,
    fs,
    hash::Hash,
    io,
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::Context as _;
use aya::{
    Pod,
    maps::{HashMap, IterableMap as _, Map, MapData, MapError},
};
use aya_obj::generated::{BPF_F_RDONLY, BPF_F_WRONLY};
use egress_common::flow::{DIR_IN, Flow, FlowKey, Mapping, PortKey};
use rustc_hash::FxHashMap;

use crate::{batch, carry_over, pinning};

/// `BPF_NOEXIST`: insert only a key that is not there; `BPF_EXIST`: only
/// over one that is.
const BPF_NOEXIST: u64 = 1;
const BPF_EXIST: u64 = 2;
/// Pin names of a resize under way (see the module's docs).
const NEW_PIN: &str = "resize-new-";
const OLD_PIN: &str = "resize-old-";
/// Kernel memory of the state maps per flow of `max-flows` (about 480 MiB
/// per million, see the README's benchmarks).
const BYTES_PER_FLOW: u64 = 480 * 1024 * 1024 / 1_000_000;

/// The maps sized from `max-flows`, with their entries per flow (a flow's
/// two halves, its mapping's two entries, at most one client count), in
/// the order the connection state is told of.
pub const SIZED: [(&str, u32); 3] = [
    (Flows::NAME, Flows::PER_FLOW),
    (Mappings::NAME, Mappings::PER_FLOW),
    (Clients::NAME, Clients::PER_FLOW),
];

/// The size of each map sized from `max_flows`.
pub fn sizes(max_flows: u32) -> [(&'static str, u32); 3] {
    SIZED.map(|(name, per_flow)| (name, max_flows.saturating_mul(per_flow)))
}

/// The map `name` as [`SIZED`] has it (its name, entries per flow), if
/// it is sized from `max-flows`.
pub fn sized(name: &str) -> Option<(&'static str, u32)> {
    SIZED.iter().find(|(n, _)| *n == name).copied()
}

/// A map sized from `max-flows`, as pinned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pinned {
    pub name: &'static str,
    pub max_entries: u32,
    /// Entries in it.
    pub entries: u32,
}

/// A map to make anew.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Change {
    pub name: &'static str,
    /// Its size now, and the configured one.
    pub from: u32,
    pub to: u32,
    /// Entries to copy.
    pub entries: u32,
}

/// What a start does with the maps sized from `max-flows`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Plan {
    /// They have the configured size.
    #[default]
    Keep,
    /// They are made anew with the configured size, every entry copied.
    Resize {
        /// The `max-flows` they were made with.
        made_with: u32,
        max_flows: u32,
        maps: Vec<Change>,
    },
    /// Refused: they hold more than the configured size does.
    TooSmall {
        made_with: u32,
        max_flows: u32,
        /// The flows in the state.
        flows: u32,
        /// The smallest `max-flows` that holds the state.
        smallest: u32,
        /// The table that does not fit when the flows would (client
        /// counts a daemon killed part way through a sweep left, say).
        crowded: Option<Change>,
    },
}

/// What to do with `pinned` (the maps sized from `max-flows`, in the order
/// of [`SIZED`]) for `max_flows`.
pub fn plan(pinned: &[Pinned], max_flows: u32) -> Plan {
    let per = |name| sized(name).map_or(1, |(_, per_flow)| per_flow);
    let maps: Vec<Change> = pinned
        .iter()
        .map(|p| Change {
            name: p.name,
            from: p.max_entries,
            to: max_flows.saturating_mul(per(p.name)),
            entries: p.entries,
        })
        .filter(|c| c.from != c.to)
        .collect();
    let Some(first) = maps.first() else {
        return Plan::Keep;
    };
    let made_with = first.from / per(first.name);
    if maps.iter().all(|c| c.entries <= c.to) {
        return Plan::Resize {
            made_with,
            max_flows,
            maps,
        };
    }
    let holds = |c: &Change| c.entries.div_ceil(per(c.name));
    let smallest = maps.iter().map(holds).max().unwrap_or(1).max(1);
    let flows = maps.iter().find(|c| c.name == Flows::NAME);
    Plan::TooSmall {
        made_with,
        max_flows,
        flows: flows.map_or(smallest, holds),
        smallest,
        crowded: flows
            .is_none_or(|c| c.entries <= c.to)
            .then(|| maps.iter().find(|c| c.entries > c.to).copied())
            .flatten(),
    }
}

impl Plan {
    /// Why a start refuses the state in `dir`, and what to do, if it does.
    pub fn refusal(&self, dir: &Path) -> Option<(String, String)> {
        let &Plan::TooSmall {
            made_with,
            max_flows,
            flows,
            smallest,
            crowded,
        } = self
        else {
            return None;
        };
        let holds = match crowded {
            None => format!("holds {flows} flows, more than max-flows {max_flows} holds"),
            Some(c) => format!(
                "holds {} entries in {}, more than the {} max-flows {max_flows} gives it",
                c.entries, c.name, c.to
            ),
        };
        Some((
            format!(
                "the connection state in {} {holds} (it was made with max-flows {made_with}): \
                 nothing was changed",
                dir.display()
            ),
            format!(
                "run with max-flows {smallest} or more (the smallest that holds them; the \
                 state is resized to it), or start over with --reset-state (live connections \
                 through the gateway will break)"
            ),
        ))
    }

    /// What a start does to the state in `dir`, if it resizes it.
    pub fn describe(&self, dir: &Path) -> Option<String> {
        let Plan::Resize {
            made_with,
            max_flows,
            maps,
        } = self
        else {
            return None;
        };
        let entries: u64 = maps.iter().map(|c| u64::from(c.entries)).sum();
        let flows = maps
            .iter()
            .find(|c| c.name == Flows::NAME)
            .map_or(0, |c| c.entries.div_ceil(Flows::PER_FLOW));
        let mib = (u64::from(*max_flows) * BYTES_PER_FLOW).div_ceil(1024 * 1024);
        Some(format!(
            "the connection state in {} was made with max-flows {made_with}: a start resizes \
             it to max-flows {max_flows}, copying its {flows} flows ({entries} entries: {}); \
             the old and the new tables both exist during the copy (the new about {mib} MiB)",
            dir.display(),
            tally(maps.iter().map(|c| (c.name, u64::from(c.entries))))
        ))
    }
}

/// `NAME n, NAME n, …`.
fn tally(counts: impl Iterator<Item = (&'static str, u64)>) -> String {
    let mut out = String::new();
    for (name, n) in counts {
        let sep = if out.is_empty() { "" } else { ", " };
        let _ = write!(out, "{sep}{name} {n}");
    }
    out
}

/// The entries in the map `data` pinned as `name` (one of [`SIZED`]).
pub fn count(name: &str, data: MapData) -> anyhow::Result<u32> {
    let context = || format!("cannot count the entries of {name}");
    let entries = match name {
        Flows::NAME => entries::<Flows>(data),
        Mappings::NAME => entries::<Mappings>(data),
        Clients::NAME => entries::<Clients>(data),
        _ => anyhow::bail!("{name} is not sized from max-flows"),
    };
    entries.with_context(context)
}

fn entries<L: Layout>(data: MapData) -> anyhow::Result<u32> {
    let map = L::open(data)?;
    Ok(batch::batches(&map).try_fold(0, |n, b| b.map(|b| n + b.len() as u32))?)
}

/// How the entries of a map sized from `max-flows` go in.
trait Layout: 'static {
    const NAME: &'static str;
    const PER_FLOW: u32;
    type K: Pod + Eq + Hash + Send;
    type V: Pod + Send;

    /// Whether the entry under `key` goes in only after its twin, and
    /// only if the twin is its own: a flow's outbound half after its
    /// return half, a client's mapping after its port's reservation, as
    /// the data path inserts them (its `state::create`).
    fn second(_key: &Self::K) -> bool {
        false
    }

    /// Whether the twin of (`key`, `value`) in `map` is its own.
    fn twin_is_ours(_map: &Table<Self>, _key: &Self::K, _value: &Self::V) -> bool {
        true
    }

    fn open(data: MapData) -> Result<Table<Self>, MapError> {
        HashMap::try_from(Map::from_map_data(data)?)
    }

    /// What a catch-up remembers of an entry it copied (or carried over),
    /// to tell whether the old map changed it since.
    fn kept(value: &Self::V) -> u64;

    /// The entry to write over `new` in the new map for `old`, changed in
    /// the old map since it was copied (see `carry_over`); `kept`: what
    /// was kept of the old entry then, if this resize copied it.
    fn carried(old: &Self::V, new: &Self::V, kept: Option<u64>) -> Option<Self::V>;

    /// What is kept of an old entry that the new data path made anew
    /// meanwhile, under a key the old map gained since the copy, if the
    /// two are to be carried over as one; `None`: the new one is its own
    /// (a flow half, with its own translation).
    const MADE_ANEW_KEEPS: Option<u64> = None;
}

type Table<L> = HashMap<MapData, <L as Layout>::K, <L as Layout>::V>;

struct Flows;
struct Mappings;
struct Clients;

impl Layout for Flows {
    const NAME: &'static str = "FLOWS";
    const PER_FLOW: u32 = 2;
    type K = FlowKey;
    type V = Flow;

    fn second(key: &FlowKey) -> bool {
        key.dir != DIR_IN
    }

    fn twin_is_ours(map: &Table<Self>, _: &FlowKey, out: &Flow) -> bool {
        let ends = |f: &Flow| (f.client_addr, f.client_port, f.nat_addr, f.nat_port);
        map.get(&out.in_key(), 0)
            .is_ok_and(|inb| ends(&inb) == ends(out))
    }

    fn kept(half: &Flow) -> u64 {
        carry_over::fingerprint(half)
    }

    fn carried(old: &Flow, new: &Flow, _: Option<u64>) -> Option<Flow> {
        carry_over::flow_half(old, new)
    }
}

impl Layout for Mappings {
    const NAME: &'static str = "MAPPINGS";
    const PER_FLOW: u32 = 2;
    type K = PortKey;
    type V = Mapping;

    fn second(key: &PortKey) -> bool {
        key.dir != DIR_IN
    }

    fn twin_is_ours(map: &Table<Self>, client: &PortKey, nat: &Mapping) -> bool {
        let reservation = PortKey {
            addr: nat.addr,
            port: nat.port,
            proto: client.proto,
            dir: DIR_IN,
        };
        map.get(&reservation, 0)
            .is_ok_and(|m| (m.addr, m.port) == (client.addr, client.port))
    }

    fn kept(m: &Mapping) -> u64 {
        m.used_ns
    }

    fn carried(old: &Mapping, new: &Mapping, _: Option<u64>) -> Option<Mapping> {
        carry_over::mapping(old, new)
    }
}

impl Layout for Clients {
    const NAME: &'static str = "CLIENT_FLOWS";
    const PER_FLOW: u32 = 1;
    type K = [u8; 4];
    type V = u64;
    /// A count: the new one counts none of the old one's flows.
    const MADE_ANEW_KEEPS: Option<u64> = Some(0);

    fn kept(count: &u64) -> u64 {
        *count
    }

    /// Without what was copied, the count is left to the next sweep,
    /// which sets it from the flows.
    fn carried(old: &u64, new: &u64, kept: Option<u64>) -> Option<u64> {
        carry_over::client_count(*old, *new, kept?)
    }
}

/// A resize's work left for after the copy: entries the old maps gain
/// until the previous data path stops using them.
pub struct Pending {
    maps: Vec<Box<dyn CatchUp + Send>>,
}

/// Counts of one catch-up.
#[derive(Default)]
struct Caught {
    /// Copied into the new map.
    copied: u64,
    /// Changed in the old map since copied, and carried over.
    carried: u64,
    /// Not copied: the new data path made them meanwhile, or they are
    /// second halves whose twin in the new map is another's.
    skipped: u64,
    /// Not copied: the new map is full.
    full: u64,
}

/// A map sized from `max-flows` with old maps to catch up from.
trait CatchUp {
    fn name(&self) -> &'static str;
    fn catch_up(&mut self) -> anyhow::Result<Caught>;
    /// Lets the old maps go: their pins are removed.
    fn release(&mut self) -> anyhow::Result<()>;
}

/// An old map, pinned at `pin` until its entries are caught up.
struct Source<L: Layout> {
    map: Table<L>,
    pin: PathBuf,
}

/// The map pinned as `L::NAME` and the old maps it takes entries from.
struct Resized<L: Layout> {
    map: Table<L>,
    sources: Vec<Source<L>>,
    /// Keys `map` is known to hold, so a catch-up reads the old maps
    /// alone, each with what was kept ([`Layout::kept`]) of the old entry
    /// copied or carried over; read from `map` at the first catch-up if
    /// not known.
    known: Option<FxHashMap<L::K, u64>>,
    /// Whether `known` keeps what this resize copied from its one old map
    /// (not what another start's resize left in `map`).
    copied_here: bool,
}

impl<L: Layout> CatchUp for Resized<L> {
    fn name(&self) -> &'static str {
        L::NAME
    }

    fn catch_up(&mut self) -> anyhow::Result<Caught> {
        let known = match &mut self.known {
            Some(known) => known,
            None => {
                let mut keys = FxHashMap::default();
                for entries in batch::batches(&self.map) {
                    keys.extend(entries?.into_iter().map(|(k, v)| (k, L::kept(&v))));
                }
                self.known.insert(keys)
            }
        };
        let (mut missing, mut changed) = (Vec::new(), Vec::new());
        for source in &self.sources {
            for entries in batch::batches(&source.map) {
                for (key, value) in entries? {
                    match known.get(&key) {
                        None => missing.push((key, value)),
                        Some(&kept) if kept != L::kept(&value) => changed.push((key, value, kept)),
                        Some(_) => {}
                    }
                }
            }
        }
        // Return halves and reservations first (a stable sort).
        missing.sort_by_key(|(k, _)| L::second(k));
        let mut caught = Caught::default();
        for (key, value) in missing {
            if L::second(&key) && !L::twin_is_ours(&self.map, &key, &value) {
                caught.skipped += 1;
                continue;
            }
            match self.map.insert(&key, &value, BPF_NOEXIST) {
                Ok(()) => caught.copied += 1,
                Err(MapError::SyscallError(e)) => match e.io_error.raw_os_error() {
                    Some(libc::EEXIST) => match L::MADE_ANEW_KEEPS {
                        Some(kept) => changed.push((key, value, kept)),
                        None => caught.skipped += 1,
                    },
                    Some(libc::E2BIG) => {
                        caught.full += 1;
                        continue;
                    }
                    _ => return Err(e.into()),
                },
                Err(e) => return Err(e.into()),
            }
            known.insert(key, L::kept(&value));
        }
        for (key, old, kept) in changed {
            // Read, then written at once: what the new data path changes
            // in between is lost (a packet's count and flags, the next
            // segment's flags recording them again; a client's new flow,
            // counted again by the next sweep; a mapping's use).
            let new = match self.map.get(&key, 0) {
                Ok(new) => new,
                Err(MapError::KeyNotFound) => continue,
                Err(e) => return Err(e.into()),
            };
            let kept = self.copied_here.then_some(kept);
            if let Some(value) = L::carried(&old, &new, kept) {
                match self.map.insert(&key, &value, BPF_EXIST) {
                    Ok(()) => caught.carried += 1,
                    Err(MapError::SyscallError(e))
                        if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            known.insert(key, L::kept(&old));
        }
        Ok(caught)
    }

    fn release(&mut self) -> anyhow::Result<()> {
        for source in self.sources.drain(..) {
            pinning::unpin(&source.pin)?;
        }
        Ok(())
    }
}

impl Pending {
    /// Copies into the new maps what the old ones gained since the last
    /// copy (`when`: at what point, for the log).
    pub fn catch_up(&mut self, when: &str) {
        let started = Instant::now();
        let (mut copied, mut carried) = (Vec::new(), Vec::new());
        let (mut full, mut failed) = (0, false);
        // A thread each: most of it is the kernel reading the old maps.
        let caught: Vec<_> = std::thread::scope(|scope| {
            let threads: Vec<_> = self
                .maps
                .iter_mut()
                .map(|map| scope.spawn(|| map.catch_up()))
                .collect();
            threads.into_iter().map(joined).collect()
        });
        for (map, caught) in self.maps.iter().zip(caught) {
            match caught {
                Ok(c) => {
                    copied.push((map.name(), c.copied));
                    carried.push((map.name(), c.carried));
                    full += c.full;
                    tracing::debug!(
                        map = map.name(),
                        copied = c.copied,
                        carried = c.carried,
                        skipped = c.skipped,
                        full = c.full,
                        "caught up"
                    );
                }
                Err(e) => {
                    failed = true;
                    tracing::warn!(
                        "{e:#}: cannot copy the entries the previous data path made in {} \
                         since the copy ({when}): its connections made meanwhile may break",
                        map.name()
                    );
                }
            }
        }
        let total: u64 = copied.iter().map(|&(_, n)| n).sum();
        let changed: u64 = carried.iter().map(|&(_, n)| n).sum();
        let ms = started.elapsed().as_millis();
        if full > 0 {
            tracing::warn!(
                entries = full,
                "the resized connection state is full: entries the previous data path made \
                 since the copy ({when}) do not fit, and their connections break"
            );
        }
        if !failed {
            tracing::info!(
                entries = total,
                changed,
                ms,
                "caught up the resized connection state {when}: copied what the previous data \
                 path made since ({}), and carried over what it changed in entries copied \
                 before ({})",
                tally(copied.into_iter()),
                tally(carried.into_iter())
            );
        }
    }

    /// The last catch-up, once the new programs have taken the previous
    /// ones' place: then the old maps go (their memory with them, once no
    /// program uses them).
    pub fn finish(mut self) {
        self.catch_up("after the attach");
        for map in &mut self.maps {
            if let Err(e) = map.release() {
                tracing::warn!(
                    "{e:#}: the old {} map stays pinned, holding its memory, until the next start",
                    map.name()
                );
            }
        }
    }
}

/// Brings the state in `dir` to `plan`, and takes up an interrupted
/// resize's old maps (see the module's docs). Returns the catch-ups left
/// for after the copy, if any.
pub fn apply(dir: &Path, plan: &Plan) -> anyhow::Result<Option<Pending>> {
    let mut leftovers = tidy(dir)?;
    let changes = match plan {
        Plan::Resize { maps, .. } => maps.as_slice(),
        _ => &[],
    };
    if changes.is_empty() && leftovers.is_empty() {
        return Ok(None);
    }
    let started = Instant::now();
    let work = SIZED.map(|(name, _)| {
        let change = changes.iter().find(|c| c.name == name);
        let old: Vec<_> = leftovers
            .extract_if(.., |(n, _)| *n == name)
            .map(|(_, p)| p)
            .collect();
        (name, change, old)
    });
    // A thread each, as in a catch-up.
    let made: Vec<_> = std::thread::scope(|scope| {
        let threads: Vec<_> = work
            .into_iter()
            .map(|(name, change, old)| {
                scope.spawn(move || match name {
                    Flows::NAME => resized::<Flows>(dir, change, old),
                    Mappings::NAME => resized::<Mappings>(dir, change, old),
                    _ => resized::<Clients>(dir, change, old),
                })
            })
            .collect();
        threads.into_iter().map(joined).collect()
    });
    let mut maps = Vec::new();
    for made in made {
        match made {
            Ok(Some(map)) => maps.push(map),
            Ok(None) => {}
            Err(e) => {
                // None replaced yet: as before.
                if let Err(e) = tidy(dir) {
                    tracing::warn!("{e:#}");
                }
                return Err(e);
            }
        }
    }
    // The step that counts: each map replaced at once.
    for c in changes {
        let (new, pin) = (dir.join(format!("{NEW_PIN}{}", c.name)), dir.join(c.name));
        fs::rename(&new, &pin).with_context(|| {
            format!(
                "cannot pin the resized {} in place of the old one ({} -> {}); the next \
                 start finishes the resize",
                c.name,
                new.display(),
                pin.display()
            )
        })?;
    }
    if let Plan::Resize {
        made_with,
        max_flows,
        maps: changes,
    } = plan
    {
        let sizes: Vec<String> = changes
            .iter()
            .map(|c| format!("{} {} -> {}", c.name, c.from, c.to))
            .collect();
        tracing::info!(
            dir = %dir.display(),
            entries = changes.iter().map(|c| u64::from(c.entries)).sum::<u64>(),
            ms = started.elapsed().as_millis(),
            "resized the connection state from max-flows {made_with} to {max_flows} \
             ({}), every entry copied ({}); what the previous data path makes until the new \
             one takes its place is copied after",
            sizes.join(", "),
            tally(changes.iter().map(|c| (c.name, u64::from(c.entries)))),
        );
    }
    Ok(Some(Pending { maps }))
}

/// What a thread returned; its panic as an error.
fn joined<T>(thread: std::thread::ScopedJoinHandle<'_, anyhow::Result<T>>) -> anyhow::Result<T> {
    thread
        .join()
        .unwrap_or_else(|_| Err(anyhow::anyhow!("a resize thread panicked")))
}

/// The map `L::NAME` in `dir` made anew as `change` says (every entry
/// copied, pinned as `resize-new-NAME`, the old one also as
/// `resize-old-NAME-ID`), with `old` maps of earlier resizes to catch up
/// from; `None` if there is nothing to do.
fn resized<L: Layout>(
    dir: &Path,
    change: Option<&Change>,
    old: Vec<PathBuf>,
) -> anyhow::Result<Option<Box<dyn CatchUp + Send>>> {
    let mut sources = old
        .into_iter()
        .map(|pin| {
            let map = L::open(MapData::from_pin(&pin)?)?;
            Ok(Source { map, pin })
        })
        .collect::<Result<Vec<_>, MapError>>()
        .with_context(|| format!("cannot open an old {} map", L::NAME))?;
    let pin = dir.join(L::NAME);
    let Some(change) = change else {
        if sources.is_empty() {
            return Ok(None);
        }
        let map = L::open(MapData::from_pin(&pin)?)?;
        return Ok(Some(Box::new(Resized::<L> {
            map,
            sources,
            known: None,
            copied_here: false,
        })));
    };
    let context = || format!("cannot resize {}", pin.display());
    let old = MapData::from_pin(&pin).with_context(context)?;
    let info = old.info().with_context(context)?;
    let params = aya_obj::Map::new_from_params(
        info.map_type().with_context(context)? as u32,
        info.key_size(),
        info.value_size(),
        change.to,
        info.map_flags() & !(BPF_F_RDONLY | BPF_F_WRONLY),
    );
    let new = MapData::create(params, L::NAME, None).map_err(|e| match e {
        MapError::CreateError { io_error, .. }
            if matches!(io_error.raw_os_error(), Some(libc::ENOMEM | libc::E2BIG)) =>
        {
            anyhow::anyhow!(
                "cannot create {} anew with {} entries: {io_error}: during the copy the old \
                 and the new tables both take kernel memory (about 480 MiB per million \
                 flows); lower --max-flows",
                L::NAME,
                change.to
            )
        }
        e => anyhow::Error::new(e).context(context()),
    })?;
    let (old, new) = (L::open(old)?, L::open(new)?);
    let copied_here = sources.is_empty();
    let mut known = FxHashMap::default();
    for entries in batch::batches(&old) {
        let entries = entries.with_context(context)?;
        batch::insert(&new, &entries).map_err(|e| match e.raw_os_error() {
            Some(libc::E2BIG) => anyhow::anyhow!(
                "{} gained entries past {} while being resized (the data path runs on): \
                 nothing was changed; give a larger max-flows",
                L::NAME,
                change.to
            ),
            _ => anyhow::Error::new(e).context(context()),
        })?;
        known.extend(entries.into_iter().map(|(k, v)| (k, L::kept(&v))));
    }
    let old_pin = dir.join(format!("{OLD_PIN}{}-{}", L::NAME, info.id()));
    new.map()
        .pin(dir.join(format!("{NEW_PIN}{}", L::NAME)))
        .with_context(context)?;
    old.map().pin(&old_pin).with_context(context)?;
    sources.push(Source {
        map: old,
        pin: old_pin,
    });
    Ok(Some(Box::new(Resized::<L> {
        map: new,
        sources,
        known: Some(known),
        copied_here,
    })))
}

/// A pin of a resize left in a state directory.
#[derive(Debug, PartialEq, Eq)]
enum Leftover<'a> {
    /// A new map never put in place.
    New,
    /// An old map of `name`.
    Old { name: &'a str },
}

fn leftover(pin: &str) -> Option<Leftover<'_>> {
    if pin.strip_prefix(NEW_PIN).is_some() {
        return Some(Leftover::New);
    }
    let (name, id) = pin.strip_prefix(OLD_PIN)?.rsplit_once('-')?;
    id.parse::<u32>().ok()?;
    Some(Leftover::Old { name })
}

/// The pins of a resize in `dir`, each with the map it holds an old one
/// of (`None`: one to remove, a new map never put in place or an old map
/// this version does not resize).
fn pins(dir: &Path) -> anyhow::Result<Vec<(PathBuf, Option<&'static str>)>> {
    let listed = match fs::read_dir(dir) {
        Ok(listed) => listed,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("cannot list {}", dir.display())),
    };
    let mut pins = Vec::new();
    for entry in listed {
        let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
        let old = match entry.file_name().to_str().and_then(leftover) {
            Some(Leftover::New) => None,
            Some(Leftover::Old { name }) => sized(name).map(|(name, _)| name),
            None => continue,
        };
        pins.push((entry.path(), old));
    }
    Ok(pins)
}

/// A pin an interrupted resize left in a state directory (see the
/// module's docs), as the next start takes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Remnant {
    pub pin: PathBuf,
    /// The map it holds an old table of, replaced by its copy: the next
    /// start copies what it holds beyond the copy, then removes it.
    /// `None`: one the next start removes (a copy never put in place, or
    /// an old table that was not replaced).
    pub replaced: Option<&'static str>,
}

/// The pins an interrupted resize left in `dir`; an error is one that
/// stops the next start too.
pub fn remnants(dir: &Path) -> anyhow::Result<Vec<Remnant>> {
    pins(dir)?
        .into_iter()
        .map(|(pin, found)| {
            let replaced = match found {
                Some(name) if replaced(dir, name, &pin)? => Some(name),
                _ => None,
            };
            Ok(Remnant { pin, replaced })
        })
        .collect()
}

/// Removes the pins of an interrupted resize that changed nothing (see
/// the module's docs); returns those of old maps a resize replaced, whose
/// entries are to be caught up, by map name.
fn tidy(dir: &Path) -> anyhow::Result<Vec<(&'static str, PathBuf)>> {
    let mut old = Vec::new();
    for Remnant { pin, replaced } in remnants(dir)? {
        match replaced {
            Some(name) => old.push((name, pin)),
            None => {
                pinning::unpin(&pin)?;
                tracing::info!(pin = %pin.display(), "removed a pin an interrupted resize left");
            }
        }
    }
    if !old.is_empty() {
        tracing::warn!(
            dir = %dir.display(),
            old = ?old.iter().map(|(_, p)| p.display().to_string()).collect::<Vec<_>>(),
            "a resize of the connection state was interrupted after its maps were replaced: \
             what the old maps hold beyond the new ones is copied"
        );
    }
    Ok(old)
}

/// Removes every pin of a resize in `dir` (the state removed with them);
/// returns how many there were.
pub fn discard(dir: &Path) -> anyhow::Result<usize> {
    let pins = pins(dir)?;
    for (pin, _) in &pins {
        pinning::unpin(pin)?;
    }
    Ok(pins.len())
}

/// Whether the old map pinned at `old` was replaced by the one pinned as
/// `name` in `dir`, of the same layout (and not removed: `--reset-state`).
fn replaced(dir: &Path, name: &str, old: &Path) -> anyhow::Result<bool> {
    let path = dir.join(name);
    let current = match MapData::from_pin(&path) {
        Ok(current) => current
            .info()
            .with_context(|| format!("cannot read {}", path.display()))?,
        Err(MapError::SyscallError(e)) if e.io_error.kind() == io::ErrorKind::NotFound => {
            return Ok(false);
        }
        Err(e) => return Err(e).with_context(|| format!("cannot open {}", path.display())),
    };
    let old = MapData::from_pin(old)
        .map_err(anyhow::Error::from)
        .and_then(|m| Ok(m.info()?))
        .with_context(|| format!("cannot read {}", old.display()))?;
    Ok(old.id() != current.id()
        && (old.map_type()? as u32, old.key_size(), old.value_size())
            == (
                current.map_type()? as u32,
                current.key_size(),
                current.value_size(),
            ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pinned(flows: (u32, u32), mappings: (u32, u32), clients: (u32, u32)) -> [Pinned; 3] {
        let p = |name, (max_entries, entries)| Pinned {
            name,
            max_entries,
            entries,
        };
        [
            p("FLOWS", flows),
            p("MAPPINGS", mappings),
            p("CLIENT_FLOWS", clients),
        ]
    }

    #[test]
    fn maps_of_the_configured_size_are_kept() {
        assert_eq!(plan(&[], 1024), Plan::Keep);
        let state = pinned((2048, 10), (2048, 10), (1024, 1));
        assert_eq!(plan(&state, 1024), Plan::Keep);
    }

    #[test]
    fn a_larger_max_flows_resizes_every_sized_map() {
        let state = pinned((8, 6), (8, 6), (4, 2));
        let Plan::Resize {
            made_with,
            max_flows,
            maps,
        } = plan(&state, 16)
        else {
            panic!("expected a resize");
        };
        assert_eq!((made_with, max_flows), (4, 16));
        let sizes: Vec<_> = maps
            .iter()
            .map(|c| (c.name, c.from, c.to, c.entries))
            .collect();
        assert_eq!(
            sizes,
            [
                ("FLOWS", 8, 32, 6),
                ("MAPPINGS", 8, 32, 6),
                ("CLIENT_FLOWS", 4, 16, 2)
            ]
        );
    }

    #[test]
    fn a_shrink_that_holds_every_entry_resizes() {
        // Full to the last entry is still every flow kept.
        let state = pinned((64, 8), (64, 8), (32, 4));
        assert!(matches!(
            plan(&state, 4),
            Plan::Resize { made_with: 32, .. }
        ));
    }

    #[test]
    fn a_shrink_below_the_entries_is_refused_naming_the_smallest_that_holds_them() {
        // 5 flows (10 halves), 3 mappings, 4 clients.
        let state = pinned((64, 10), (64, 6), (32, 4));
        assert_eq!(
            plan(&state, 4),
            Plan::TooSmall {
                made_with: 32,
                max_flows: 4,
                flows: 5,
                smallest: 5,
                crowded: None,
            }
        );
        // The client table can decide too (a lone flow half rounds up).
        let state = pinned((64, 7), (64, 2), (32, 6));
        assert!(matches!(
            plan(&state, 2),
            Plan::TooSmall {
                flows: 4,
                smallest: 6,
                ..
            }
        ));
        let (what, fix) = plan(&state, 2)
            .refusal(Path::new("/sys/fs/bpf/egress"))
            .unwrap();
        assert_eq!(
            what,
            "the connection state in /sys/fs/bpf/egress holds 4 flows, more than max-flows 2 \
             holds (it was made with max-flows 32): nothing was changed"
        );
        assert!(fix.starts_with("run with max-flows 6 or more"), "{fix}");
        assert!(fix.contains("--reset-state"), "{fix}");
    }

    #[test]
    fn a_shrink_the_flows_fit_is_refused_naming_the_table_they_do_not() {
        // One flow, but counts of 6 clients (a daemon killed part way
        // through a sweep leaves them until the next one).
        let state = pinned((64, 2), (64, 2), (32, 6));
        let (what, fix) = plan(&state, 2)
            .refusal(Path::new("/sys/fs/bpf/egress"))
            .unwrap();
        assert_eq!(
            what,
            "the connection state in /sys/fs/bpf/egress holds 6 entries in CLIENT_FLOWS, more \
             than the 2 max-flows 2 gives it (it was made with max-flows 32): nothing was changed"
        );
        assert!(fix.starts_with("run with max-flows 6 or more"), "{fix}");
    }

    #[test]
    fn only_maps_of_another_size_are_resized() {
        // As an interrupted resize might leave them: the flows done.
        let state = pinned((32, 6), (8, 6), (4, 2));
        let Plan::Resize {
            made_with, maps, ..
        } = plan(&state, 16)
        else {
            panic!("expected a resize");
        };
        assert_eq!(made_with, 4);
        let names: Vec<_> = maps.iter().map(|c| c.name).collect();
        assert_eq!(names, ["MAPPINGS", "CLIENT_FLOWS"]);
    }

    #[test]
    fn a_resize_is_described_with_its_entries_and_memory() {
        let state = pinned((2_097_152, 6), (2_097_152, 4), (1_048_576, 1));
        let text = plan(&state, 2_000_000)
            .describe(Path::new("/sys/fs/bpf/egress"))
            .unwrap();
        assert_eq!(
            text,
            "the connection state in /sys/fs/bpf/egress was made with max-flows 1048576: a \
             start resizes it to max-flows 2000000, copying its 3 flows (11 entries: FLOWS 6, \
             MAPPINGS 4, CLIENT_FLOWS 1); the old and the new tables both exist during the \
             copy (the new about 960 MiB)"
        );
        assert_eq!(Plan::Keep.describe(Path::new("/x")), None);
        assert_eq!(Plan::Keep.refusal(Path::new("/x")), None);
    }

    #[test]
    fn sizes_follow_max_flows() {
        assert_eq!(
            sizes(1000),
            [("FLOWS", 2000), ("MAPPINGS", 2000), ("CLIENT_FLOWS", 1000)]
        );
        assert_eq!(sizes(u32::MAX)[0].1, u32::MAX);
        assert_eq!(sized("FLOWS"), Some(("FLOWS", 2)));
        assert_eq!(sized("STATS"), None);
    }

    #[test]
    fn only_a_resize_s_own_pins_are_leftovers() {
        assert_eq!(leftover("resize-new-FLOWS"), Some(Leftover::New));
        assert_eq!(
            leftover("resize-old-CLIENT_FLOWS-4711"),
            Some(Leftover::Old {
                name: "CLIENT_FLOWS"
            })
        );
        for other in [
            "FLOWS",
            "handover-tcx-3",
            "resize-old-FLOWS",
            "resize-old-FLOWS-x",
        ] {
            assert_eq!(leftover(other), None, "{other}");
        }
    }
}
