//! Whole-map reads, bulk inserts and bulk deletes with the kernel's batch
//! commands (`BPF_MAP_LOOKUP_BATCH`, `BPF_MAP_UPDATE_BATCH`,
//! `BPF_MAP_DELETE_BATCH`, Linux 5.6), which aya does not wrap: a sweep of
//! a million flows costs a few hundred system calls instead of several
//! million, a read of the flow cache one instead of a thousand.

use std::{
    borrow::Borrow,
    io,
    mem::{size_of, zeroed},
    os::fd::{AsFd as _, AsRawFd as _},
};

use aya::{
    Pod,
    maps::{Array, HashMap, IterableMap as _, MapData, PerCpuArray},
    util::nr_cpus,
};

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;
/// Entries per system call.
pub const CHUNK: usize = 4096;

/// The `batch` member of `union bpf_attr` (linux/bpf.h).
#[repr(C)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

fn bpf(cmd: libc::c_long, attr: &mut BatchAttr) -> io::Result<()> {
    // SAFETY: `attr` is a valid `bpf_attr.batch` whose pointers the caller
    // set to buffers that outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut BatchAttr,
            size_of::<BatchAttr>(),
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn attr(map: &MapData) -> BatchAttr {
    // SAFETY: all-zero is the valid "unset" value of every field.
    let mut attr: BatchAttr = unsafe { zeroed() };
    attr.map_fd = map.fd().as_fd().as_raw_fd() as u32;
    attr
}

/// Every entry of `map` (entries changed meanwhile may or may not appear).
pub fn dump<T: Borrow<MapData>, K: Pod, V: Pod>(map: &HashMap<T, K, V>) -> io::Result<Vec<(K, V)>> {
    let mut entries = Vec::new();
    for batch in batches(map) {
        entries.extend(batch?);
    }
    Ok(entries)
}

/// The entries of `map` a batch of up to [`CHUNK`] at a time, so a reader
/// can stop part way.
pub fn batches<T: Borrow<MapData>, K: Pod, V: Pod>(
    map: &HashMap<T, K, V>,
) -> impl Iterator<Item = io::Result<Vec<(K, V)>>> + '_ {
    lookups::<K, V>(map.map(), CHUNK, 1).map(|batch| {
        let (keys, values) = batch?;
        Ok(keys.into_iter().zip(values).collect())
    })
}

/// Every value of the array `map`, in index order.
pub fn values<T: Borrow<MapData>, V: Pod>(map: &Array<T, V>) -> io::Result<Vec<V>> {
    whole_array(map.map(), map.len(), 1)
}

/// Every value of the per-CPU array `map`, each index's value on each
/// possible CPU (in no order a caller may rely on).
pub fn per_cpu_values<T: Borrow<MapData>, V: Pod>(map: &PerCpuArray<T, V>) -> io::Result<Vec<V>> {
    // The kernel lays each CPU's value out on an 8-byte stride: with a
    // size that is a multiple of 8, a `V` buffer matches that layout.
    const { assert!(size_of::<V>().is_multiple_of(8)) };
    let cpus = nr_cpus().map_err(|(_, e)| e)?;
    whole_array(map.map(), map.len(), cpus.get() as usize)
}

/// The values of the `len` indices of the array `map`, `per_key` each, in
/// one call.
fn whole_array<V: Pod>(map: &MapData, len: u32, per_key: usize) -> io::Result<Vec<V>> {
    let mut values = Vec::new();
    for batch in lookups::<u32, V>(map, len as usize, per_key) {
        values.extend(batch?.1);
    }
    Ok(values)
}

/// `BPF_MAP_LOOKUP_BATCH` over `map` (any type that supports it): up to
/// `chunk` keys per call with `per_key` values each (1, or the number of
/// possible CPUs for a per-CPU map).
fn lookups<K: Pod, V: Pod>(
    map: &MapData,
    chunk: usize,
    per_key: usize,
) -> impl Iterator<Item = io::Result<(Vec<K>, Vec<V>)>> + '_ {
    // SAFETY: `Pod` types are valid for any bit pattern, zeros included.
    let mut keys: Vec<K> = vec![unsafe { zeroed() }; chunk];
    // SAFETY: as above.
    let mut values: Vec<V> = vec![unsafe { zeroed() }; chunk * per_key];
    // The resume position, opaque to us: a bucket index for hash maps, the
    // next index for arrays.
    let mut cursor = [0u64; 2];
    let (mut first, mut done) = (true, false);
    std::iter::from_fn(move || {
        if done {
            return None;
        }
        let mut a = attr(map);
        a.in_batch = if first { 0 } else { cursor.as_ptr() as u64 };
        a.out_batch = cursor.as_mut_ptr() as u64;
        a.keys = keys.as_mut_ptr() as u64;
        a.values = values.as_mut_ptr() as u64;
        a.count = chunk as u32;
        first = false;
        match bpf(BPF_MAP_LOOKUP_BATCH, &mut a) {
            Ok(()) => {}
            // The end of the map, with the last entries in this batch.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => done = true,
            Err(e) => {
                done = true;
                return Some(Err(e));
            }
        }
        let n = a.count as usize;
        Some(Ok((keys[..n].to_vec(), values[..n * per_key].to_vec())))
    })
}

/// Puts `entries` in `map` (replacing those there), [`CHUNK`] per call;
/// stops at the first that does not go in (`E2BIG`: the map is full).
pub fn insert<T: Borrow<MapData>, K: Pod, V: Pod>(
    map: &HashMap<T, K, V>,
    entries: &[(K, V)],
) -> io::Result<()> {
    for chunk in entries.chunks(CHUNK) {
        let (keys, values): (Vec<K>, Vec<V>) = chunk.iter().copied().unzip();
        let mut a = attr(map.map());
        a.keys = keys.as_ptr() as u64;
        a.values = values.as_ptr() as u64;
        a.count = chunk.len() as u32;
        bpf(BPF_MAP_UPDATE_BATCH, &mut a)?;
    }
    Ok(())
}

/// Deletes `keys` from `map`, in order; keys already gone are skipped.
/// Returns how many of the leading keys are gone (deleted, or found gone),
/// all of them unless an error stopped the rest, and that error.
pub fn delete<T: Borrow<MapData>, K: Pod, V: Pod>(
    map: &HashMap<T, K, V>,
    keys: &[K],
) -> (usize, io::Result<()>) {
    let mut gone = 0;
    while gone < keys.len() {
        let chunk = &keys[gone..keys.len().min(gone + CHUNK)];
        let mut a = attr(map.map());
        a.keys = chunk.as_ptr() as u64;
        a.count = chunk.len() as u32;
        match bpf(BPF_MAP_DELETE_BATCH, &mut a) {
            Ok(()) => gone += chunk.len(),
            // Stopped at a key that is not there: skip it, go on after it.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => gone += a.count as usize + 1,
            // Stopped at a key it could not delete, `count` set to the
            // keys deleted before it. An error before the kernel began
            // (a read-only handle, say) leaves `count` as given: none.
            Err(e) => {
                let deleted = a.count as usize;
                return (
                    gone + if deleted < chunk.len() { deleted } else { 0 },
                    Err(e),
                );
            }
        }
    }
    (gone, Ok(()))
}
