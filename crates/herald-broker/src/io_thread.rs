//! The thread a networked broker runs its connections and subscription tasks on.

use tokio::sync::oneshot;

use crate::BrokerError;

/// A thread of the broker's own, with a single-threaded runtime: it runs the broker's
/// connections and subscription tasks (for Redis: the command connection's driver and the
/// pub/sub task), which hands each publication to the hub, whose
/// fan-out pushes it into the subscribers' queues. On the node's connection runtime instead,
/// every publication from Redis would be fanned out between two rounds of the writers it
/// wakes, so each writer would send one frame per wake-up: at saturation (one node, 3,000
/// subscribers, HTTP publishers) 12 times fewer deliveries per second than the memory broker,
/// whose publishers fan out from the API runtime. Here, as there, queues fill while writers
/// write, and each wake-up sends what accumulated in one vectored write.
pub(crate) struct IoThread {
    /// Where the broker spawns its tasks and opens its connections.
    pub(crate) handle: tokio::runtime::Handle,
    /// Dropped with the broker: the thread's runtime then stops, with its tasks.
    _stop: oneshot::Sender<()>,
}

impl IoThread {
    /// Starts the thread (named `name`).
    pub(crate) fn start(name: &str) -> Result<IoThread, BrokerError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| BrokerError::Backend(format!("cannot start the broker thread: {e}")))?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                runtime.block_on(async {
                    let _ = stopped.await;
                });
            })
            .map_err(|e| BrokerError::Backend(format!("cannot start the broker thread: {e}")))?;
        Ok(IoThread { handle, _stop: stop })
    }
}

/// Clears a readiness flag when dropped: a broker task that ends (or panics) takes the node's
/// readiness with it, so `/readyz` says so instead of staying green over a dead task.
pub(crate) struct ClearOnExit(pub(crate) std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Drop for ClearOnExit {
    fn drop(&mut self) {
        self.0.store(false, std::sync::atomic::Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    use super::ClearOnExit;

    #[tokio::test]
    async fn a_task_that_panics_takes_readiness_with_it() {
        let ready = Arc::new(AtomicBool::new(true));
        let guard = ClearOnExit(ready.clone());
        let task = tokio::spawn(async move {
            let _guard = guard;
            panic!("a broker task fails");
        });
        assert!(task.await.is_err());
        assert!(!ready.load(Ordering::Acquire), "not ready once the task is gone");
    }
}
