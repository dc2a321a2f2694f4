//! [`Collective`] over MPI (rsmpi), with a watchdog: MPI's blocking collectives have no
//! timeout, so a rank that hangs (or a network that stops delivering) would leave every other
//! rank waiting for ever. The watchdog thread ends this process with a message naming the
//! collective once one has waited longer than the timeout; `mpirun` then ends the others.
//! A rank that dies outright is caught by `mpirun` itself, which ends the job.

use std::cell::Cell;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mpi::collective::{CommunicatorCollectives, SystemOperation};
use mpi::environment::Universe;
use mpi::topology::{Communicator, SimpleCommunicator};

use super::{Collective, DistributedError, Traffic};

/// What a rank is waiting on, and since when.
type Waiting = Arc<Mutex<Option<(&'static str, Instant)>>>;

pub struct MpiCollective {
    // Dropped last: finalises MPI.
    _universe: Universe,
    world: SimpleCommunicator,
    rank: usize,
    size: usize,
    local_rank: usize,
    local_size: usize,
    waiting: Waiting,
    traffic: Cell<Traffic>,
}

impl MpiCollective {
    /// Initialises MPI (once per process) and starts the watchdog: a collective that waits
    /// longer than `timeout` ends this process with exit status 3 and a message.
    pub fn init(timeout: Duration) -> Result<Self, DistributedError> {
        let (universe, _threading) = mpi::initialize_with_threading(mpi::Threading::Serialized)
            .ok_or_else(|| DistributedError::Collective {
                what: "MPI initialisation",
                message: "MPI was already initialised in this process".into(),
            })?;
        let world = universe.world();
        let rank = world.rank() as usize;
        let size = world.size() as usize;
        let node = world.split_shared(world.rank());
        let (local_rank, local_size) = (node.rank() as usize, node.size() as usize);
        let waiting: Waiting = Arc::new(Mutex::new(None));
        let watched = waiting.clone();
        std::thread::Builder::new()
            .name("gca-hng-watchdog".into())
            .spawn(move || watchdog(watched, rank, size, timeout))
            .map_err(|e| DistributedError::Collective {
                what: "watchdog",
                message: e.to_string(),
            })?;
        Ok(Self {
            _universe: universe,
            world,
            rank,
            size,
            local_rank,
            local_size,
            waiting,
            traffic: Cell::new(Traffic::default()),
        })
    }

    /// Ends every rank of the job with `code` (after this rank reported why).
    pub fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }

    fn watched<T>(&self, what: &'static str, f: impl FnOnce() -> T) -> T {
        *self.waiting.lock().expect("watchdog lock") = Some((what, Instant::now()));
        let out = f();
        *self.waiting.lock().expect("watchdog lock") = None;
        out
    }

    fn count(&self, f: impl FnOnce(&mut Traffic)) {
        let mut t = self.traffic.get();
        f(&mut t);
        self.traffic.set(t);
    }
}

fn watchdog(waiting: Waiting, rank: usize, size: usize, timeout: Duration) {
    loop {
        std::thread::sleep(Duration::from_millis(250));
        let stuck = match *waiting.lock().expect("watchdog lock") {
            Some((what, since)) if since.elapsed() > timeout => Some(what),
            _ => None,
        };
        if let Some(what) = stuck {
            eprintln!(
                "error: rank {rank} of {size}: collective `{what}` has waited more than {} s for the other processes; one of them has stopped or hangs. Stopping this process (the checkpoint `last` of rank 0 resumes the run).",
                timeout.as_secs()
            );
            // SAFETY: `_exit` ends the process without running atexit handlers, which could
            // block in MPI's own shutdown while another thread waits inside MPI.
            unsafe { libc::_exit(3) };
        }
    }
}

impl Collective for MpiCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn local_rank(&self) -> usize {
        self.local_rank
    }

    fn local_size(&self) -> usize {
        self.local_size
    }

    fn all_gather(&self, what: &'static str, local: &[f32]) -> Result<Vec<f32>, DistributedError> {
        let mut out = vec![0f32; local.len() * self.size];
        self.watched(what, || self.world.all_gather_into(local, &mut out[..]));
        self.count(|t| t.gather_bytes += (out.len() * 4) as u64);
        Ok(out)
    }

    fn all_reduce_sum(
        &self,
        what: &'static str,
        values: &mut [f32],
    ) -> Result<(), DistributedError> {
        let send = values.to_vec();
        self.watched(what, || {
            self.world
                .all_reduce_into(&send[..], values, SystemOperation::sum())
        });
        self.count(|t| t.reduce_bytes += (values.len() * 4) as u64);
        Ok(())
    }

    fn all_reduce_max(
        &self,
        what: &'static str,
        values: &mut [u64],
    ) -> Result<(), DistributedError> {
        let send = values.to_vec();
        self.watched(what, || {
            self.world
                .all_reduce_into(&send[..], values, SystemOperation::max())
        });
        self.count(|t| t.small_bytes += (values.len() * 8) as u64);
        Ok(())
    }

    fn all_gather_u64(&self, what: &'static str, value: u64) -> Result<Vec<u64>, DistributedError> {
        let mut out = vec![0u64; self.size];
        self.watched(what, || self.world.all_gather_into(&value, &mut out[..]));
        self.count(|t| t.small_bytes += (out.len() * 8) as u64);
        Ok(out)
    }

    fn wait_for_all(&self, _what: &'static str) -> Result<(), DistributedError> {
        self.world.barrier();
        Ok(())
    }

    fn traffic(&self) -> Traffic {
        self.traffic.get()
    }
}
