//! The embedding worker pool: a fixed number of threads behind a bounded queue. A request
//! that finds the queue full is refused at once (503) instead of waiting, so memory stays
//! bounded however many clients arrive.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use bytes::Bytes;
use tokio::sync::oneshot;

use super::model::{DecodeError, ImageEmbedder, decode_image};

/// Why a job produced no embedding.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error(transparent)]
    BadImage(#[from] DecodeError),
    #[error("the model failed: {0}")]
    Model(String),
    #[error("the worker pool has stopped")]
    Stopped,
}

struct Job {
    image: Bytes,
    reply: oneshot::Sender<Result<Vec<f32>, JobError>>,
}

/// Threads that decode and embed images, most `batch` at a time each.
pub struct WorkerPool {
    tx: Option<SyncSender<Job>>,
    workers: Vec<JoinHandle<()>>,
    queued: Arc<AtomicUsize>,
    capacity: usize,
    threads: usize,
}

/// Why a job was not queued.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// The queue is at its bound: come back later.
    Full,
    Stopped,
}

impl WorkerPool {
    /// One thread per embedder (each owns its copy of the model); `queue` jobs may wait.
    pub fn new(embedders: Vec<Box<dyn ImageEmbedder>>, queue: usize, batch: usize) -> Self {
        let (tx, rx) = sync_channel::<Job>(queue.max(1));
        let rx = Arc::new(Mutex::new(rx));
        let queued = Arc::new(AtomicUsize::new(0));
        let threads = embedders.len();
        // Workers run model code with the subnormal mode of the thread that starts them
        // (`backends::subnormals`); a new thread would otherwise start with IEEE subnormals.
        let flush = crate::backends::subnormals::flushing_on_this_thread();
        let workers = embedders
            .into_iter()
            .enumerate()
            .map(|(i, embedder)| {
                let rx = rx.clone();
                let queued = queued.clone();
                std::thread::Builder::new()
                    .name(format!("embed-{i}"))
                    .spawn(move || {
                        if flush {
                            crate::backends::subnormals::flush_subnormals_on_this_thread();
                        }
                        work(embedder, &rx, &queued, batch.max(1))
                    })
                    .expect("spawning a worker thread")
            })
            .collect();
        Self {
            tx: Some(tx),
            workers,
            queued,
            capacity: queue.max(1),
            threads,
        }
    }

    /// Queues an image; the answer arrives on the returned channel.
    pub fn submit(
        &self,
        image: Bytes,
    ) -> Result<oneshot::Receiver<Result<Vec<f32>, JobError>>, Refused> {
        let tx = self.tx.as_ref().ok_or(Refused::Stopped)?;
        let (reply, rx) = oneshot::channel();
        // Counted before sending so that a worker's decrement never comes first.
        self.queued.fetch_add(1, Ordering::SeqCst);
        match tx.try_send(Job { image, reply }) {
            Ok(()) => Ok(rx),
            Err(e) => {
                self.queued.fetch_sub(1, Ordering::SeqCst);
                Err(match e {
                    TrySendError::Full(_) => Refused::Full,
                    TrySendError::Disconnected(_) => Refused::Stopped,
                })
            }
        }
    }

    /// Jobs waiting for a worker.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::SeqCst)
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn threads(&self) -> usize {
        self.threads
    }
}

impl Drop for WorkerPool {
    /// Lets the workers finish what is queued, then joins them.
    fn drop(&mut self) {
        self.tx = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

fn work(
    mut embedder: Box<dyn ImageEmbedder>,
    rx: &Mutex<Receiver<Job>>,
    queued: &AtomicUsize,
    batch: usize,
) {
    loop {
        // Take one job (waiting), then whatever else is queued up to `batch`, so that a busy
        // server embeds several images per forward pass.
        let jobs = {
            let Ok(rx) = rx.lock() else { return };
            let Ok(first) = rx.recv() else { return };
            let mut jobs = vec![first];
            while jobs.len() < batch {
                match rx.try_recv() {
                    Ok(j) => jobs.push(j),
                    Err(_) => break,
                }
            }
            jobs
        };
        queued.fetch_sub(jobs.len(), Ordering::SeqCst);
        // A client that gave up (timeout, closed connection) needs no answer.
        let jobs: Vec<Job> = jobs.into_iter().filter(|j| !j.reply.is_closed()).collect();
        let mut images = Vec::with_capacity(jobs.len());
        let mut replies = Vec::with_capacity(jobs.len());
        for job in jobs {
            match decode_image(&job.image) {
                Ok(img) => {
                    images.push(img);
                    replies.push(job.reply);
                }
                Err(e) => {
                    let _ = job.reply.send(Err(e.into()));
                }
            }
        }
        if images.is_empty() {
            continue;
        }
        // A panic inside the model must not take the worker (and its queue slot) down.
        let result =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| embedder.embed(&images)))
                .unwrap_or_else(|_| Err("the model panicked".into()));
        match result {
            Ok(rows) => {
                for (reply, row) in replies.into_iter().zip(rows) {
                    let _ = reply.send(Ok(row));
                }
            }
            Err(message) => {
                for reply in replies {
                    let _ = reply.send(Err(JobError::Model(message.clone())));
                }
            }
        }
    }
}
