//! The garbage collector's own thread. A sweep of a large table takes
//! seconds (a million flows: several), so it runs here rather than in the
//! daemon's event loop, where signals and interface changes would wait.

use std::{
    sync::{
        Arc,
        mpsc::{self, RecvTimeoutError},
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use crate::{
    clock,
    datapath::State,
    gc::{self, SharedAllowed, Stop, Timeouts, Unfinished},
    metrics::Collector,
};

/// Sweeps until dropped; dropping it stops a sweep in progress at its
/// next batch and waits for the thread.
pub struct Sweeper {
    stop: Stop,
    wake: mpsc::Sender<()>,
    thread: Option<JoinHandle<()>>,
}

impl Sweeper {
    /// Sweeps `state` now and then `interval` after each sweep ends, under
    /// the policy `allowed` as it is at the time, recording each in
    /// `metrics`. A failed sweep is logged and tried again at the next
    /// interval.
    pub fn start(
        mut state: State,
        timeouts: Timeouts,
        allowed: SharedAllowed,
        interval: Duration,
        metrics: Option<Arc<Collector>>,
    ) -> std::io::Result<Self> {
        let stop = Stop::default();
        let (wake, woken) = mpsc::channel();
        let thread = thread::Builder::new().name("gc".into()).spawn({
            let stop = stop.clone();
            move || {
                loop {
                    sweep(&mut state, &timeouts, &allowed, &stop, metrics.as_deref());
                    // Woken early only to stop.
                    if woken.recv_timeout(interval) != Err(RecvTimeoutError::Timeout) {
                        return;
                    }
                }
            }
        })?;
        Ok(Self {
            stop,
            wake,
            thread: Some(thread),
        })
    }
}

/// One sweep, recorded and logged.
fn sweep(
    state: &mut State,
    timeouts: &Timeouts,
    allowed: &SharedAllowed,
    stop: &Stop,
    metrics: Option<&Collector>,
) {
    let result = gc::sweep(state, timeouts, allowed, clock::monotonic_ns(), stop);
    if let Some(m) = metrics {
        m.record_sweep(&result);
    }
    let s = match result {
        Ok(s) => s,
        Err(Unfinished { sweep: s, .. }) if stop.requested() => {
            tracing::info!(
                expired = s.expired,
                disallowed = s.disallowed,
                mappings_expired = s.mappings_expired,
                "shutdown stopped a sweep part way; the next run finishes it"
            );
            return;
        }
        Err(Unfinished { sweep: s, error }) => {
            tracing::warn!(
                expired = s.expired,
                disallowed = s.disallowed,
                mappings_expired = s.mappings_expired,
                "flow table sweep failed part way: {error:#}"
            );
            return;
        }
    };
    if s.disallowed > 0 {
        tracing::warn!(
            flows = s.disallowed,
            "removed flows the policy no longer allows (a translation address no longer ours, \
             a peer or client no longer allowed)"
        );
    }
    if s.expired + s.mappings_expired > 0 {
        tracing::info!(
            expired = s.expired,
            live = s.live,
            mappings_expired = s.mappings_expired,
            mappings = s.mappings,
            took = ?s.took,
            "swept idle flows"
        );
    } else {
        tracing::debug!(live = s.live, mappings = s.mappings, took = ?s.took, "swept flows");
    }
}

impl Drop for Sweeper {
    fn drop(&mut self) {
        self.stop.request();
        // Fails only if the thread is gone already.
        let _ = self.wake.send(());
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("the garbage collector's thread panicked");
        }
    }
}
