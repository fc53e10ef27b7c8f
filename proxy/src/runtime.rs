//! The threads pgwarden serves clients on, `server.worker_threads` of them: `block_on`'s
//! thread (which also accepts clients and runs the background work) and worker threads
//! started here. Each runs a tokio current-thread runtime of its own; a client given to a
//! thread (`placement.rs`) is served there until it parks or moves off a busy thread
//! between transactions, so no thread wakes another on its behalf (tokio's multi-threaded
//! workers steal tasks and wake each other to do so). See docs/architecture.md, "Threads".

use std::cell::Cell;
use std::future::Future;

use anyhow::Context;
use tokio::runtime::{Builder, Handle, Runtime};

thread_local! {
    /// The serving thread this is: 1 and up on worker threads, 0 on any other thread
    /// (`block_on`'s, the first serving thread, or one of tokio's blocking threads).
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// How many worker threads `worker_threads` means (`0`: one per CPU available to the
/// process, as cgroup limits allow).
pub fn worker_count(worker_threads: usize) -> usize {
    match worker_threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

/// A runtime of one thread: `block_on`'s (the listener, the background work and clients)
/// or a worker's.
pub fn build() -> anyhow::Result<Runtime> {
    Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")
}

/// The worker thread the caller runs on.
pub fn current_worker() -> usize {
    WORKER.with(Cell::get)
}

/// A worker thread started by [`start_worker`].
pub struct Worker {
    pub handle: Handle,
    pub thread: std::thread::JoinHandle<()>,
    /// Its CPU time, if the system shows it ([`CpuClock::of_this_thread`]).
    pub cpu_clock: Option<CpuClock>,
}

/// A thread's CPU time as the kernel counts it: the first field of
/// `/proc/<pid>/task/<tid>/schedstat`, nanoseconds spent running on a CPU. Unlike the time a
/// runtime spends running tasks, it leaves out the time the thread was preempted.
#[derive(Clone, Debug)]
pub struct CpuClock(std::path::PathBuf);

impl CpuClock {
    /// The clock of the calling thread; `None` where `/proc` does not have it.
    pub fn of_this_thread() -> Option<Self> {
        let task = std::fs::read_link("/proc/thread-self").ok()?;
        let clock = Self(std::path::Path::new("/proc").join(task).join("schedstat"));
        clock.read().map(|_| clock)
    }

    /// CPU time the thread has used since it started.
    pub fn read(&self) -> Option<std::time::Duration> {
        let text = std::fs::read_to_string(&self.0).ok()?;
        let nanos = text.split_whitespace().next()?.parse().ok()?;
        Some(std::time::Duration::from_nanos(nanos))
    }
}

/// Starts worker thread `index` (1 and up) running `main` on a runtime of its own; the
/// thread ends when `main` does, dropping the tasks still on it.
pub fn start_worker<F>(index: usize, main: F) -> anyhow::Result<Worker>
where
    F: Future<Output = ()> + Send + 'static,
{
    let runtime = build()?;
    let handle = runtime.handle().clone();
    let (clock_tx, clock_rx) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new()
        .name(format!("pgwarden-worker-{index}"))
        .spawn(move || {
            WORKER.with(|w| w.set(index));
            let _ = clock_tx.send(CpuClock::of_this_thread());
            runtime.block_on(main);
        })
        .context("cannot start a worker thread")?;
    let cpu_clock = clock_rx.recv().ok().flatten();
    Ok(Worker {
        handle,
        thread,
        cpu_clock,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn zero_workers_means_one_per_cpu() {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(super::worker_count(0), cpus);
        assert_eq!(super::worker_count(3), 3);
    }

    #[test]
    fn a_worker_knows_its_index_and_runs_on_its_own_runtime() {
        let (tx, rx) = std::sync::mpsc::channel();
        let worker = super::start_worker(2, async move {
            tx.send((
                super::current_worker(),
                tokio::runtime::Handle::current().id(),
            ))
            .expect("receiver");
        })
        .expect("worker");
        let (index, runtime) = rx.recv().expect("the worker ran");
        assert_eq!(index, 2);
        assert_eq!(runtime, worker.handle.id());
        assert!(
            worker.cpu_clock.is_some(),
            "the worker's CPU time was readable (Linux /proc)"
        );
        worker.thread.join().expect("no panic");
        assert_eq!(super::current_worker(), 0);
    }
}
