//! The async runtime pgwarden serves clients on, sized by `server.worker_threads`.

use anyhow::Context;
use tokio::runtime::{Builder, Runtime};

/// Builds the runtime for `worker_threads` threads (`0`: one per CPU available to the
/// process, as cgroup limits allow). One thread gets tokio's current-thread runtime, not a
/// multi-threaded one with a single worker: there the listener would still run on its own
/// thread and wake the worker for every new client.
pub fn build(worker_threads: usize) -> anyhow::Result<Runtime> {
    let threads = match worker_threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let mut builder = if threads == 1 {
        Builder::new_current_thread()
    } else {
        let mut builder = Builder::new_multi_thread();
        builder.worker_threads(threads);
        builder
    };
    builder
        .enable_all()
        .build()
        .context("cannot start the runtime")
}

#[cfg(test)]
mod tests {
    use tokio::runtime::RuntimeFlavor;

    #[test]
    fn one_thread_is_the_current_thread_runtime_and_more_are_workers() {
        let one = super::build(1).expect("runtime");
        assert_eq!(one.handle().runtime_flavor(), RuntimeFlavor::CurrentThread);
        let three = super::build(3).expect("runtime");
        assert_eq!(three.handle().runtime_flavor(), RuntimeFlavor::MultiThread);
        assert_eq!(three.metrics().num_workers(), 3);
    }
}
