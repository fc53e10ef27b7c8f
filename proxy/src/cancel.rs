//! Cancel routing. Clients get pgwarden-issued keys (a backend's own key would be useless
//! to them, since their next transaction may run elsewhere). A CancelRequest is matched to
//! the session that holds the key and forwarded, on its own short connection, to the backend
//! serving that session at that moment, with that backend's key. A session between
//! transactions has no backend, so a cancel for it does nothing.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use pgwarden_protocol::startup::{encode_cancel, CancelKey};
use rand::Rng;
use subtle::ConstantTimeEq;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Time limit for forwarding one cancel.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);

type Current = Arc<Mutex<Option<(SocketAddr, CancelKey)>>>;

/// All live sessions' cancel keys.
#[derive(Default)]
pub struct CancelRegistry {
    sessions: Mutex<HashMap<i32, (i32, Current)>>,
}

/// What became of a CancelRequest; also the metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    Forwarded,
    /// The session exists but holds no backend: nothing to cancel.
    Idle,
    /// No session has this key (or the secret is wrong).
    Unknown,
    Failed,
}

impl CancelOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            CancelOutcome::Forwarded => "forwarded",
            CancelOutcome::Idle => "idle",
            CancelOutcome::Unknown => "unknown",
            CancelOutcome::Failed => "failed",
        }
    }
}

/// A session's entry in the registry; removed on drop.
pub struct CancelHandle {
    registry: Arc<CancelRegistry>,
    key: CancelKey,
    current: Current,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl CancelRegistry {
    /// Issues a fresh key for a new session.
    pub fn register(self: &Arc<Self>) -> CancelHandle {
        let mut rng = rand::thread_rng();
        let current = Current::default();
        let mut sessions = lock(&self.sessions);
        let key = loop {
            let pid = rng.gen_range(1..i32::MAX);
            if !sessions.contains_key(&pid) {
                break CancelKey {
                    pid,
                    secret: rng.gen(),
                };
            }
        };
        sessions.insert(key.pid, (key.secret, current.clone()));
        CancelHandle {
            registry: self.clone(),
            key,
            current,
        }
    }

    /// Handles a CancelRequest carrying `key`.
    pub async fn cancel(&self, key: CancelKey) -> CancelOutcome {
        let target = {
            let sessions = lock(&self.sessions);
            let Some((secret, current)) = sessions.get(&key.pid) else {
                return CancelOutcome::Unknown;
            };
            if !bool::from(secret.to_be_bytes().ct_eq(&key.secret.to_be_bytes())) {
                return CancelOutcome::Unknown;
            }
            let current = *lock(current);
            current
        };
        let Some((addr, backend_key)) = target else {
            return CancelOutcome::Idle;
        };
        if forward_with_timeout(addr, backend_key).await {
            CancelOutcome::Forwarded
        } else {
            CancelOutcome::Failed
        }
    }

    pub fn len(&self) -> usize {
        lock(&self.sessions).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Sends a cancel for `key` to `addr`, giving up after a few seconds.
pub async fn forward_with_timeout(addr: SocketAddr, key: CancelKey) -> bool {
    matches!(
        tokio::time::timeout(FORWARD_TIMEOUT, forward(addr, key)).await,
        Ok(Ok(()))
    )
}

async fn forward(addr: SocketAddr, key: CancelKey) -> std::io::Result<()> {
    let mut stream = TcpStream::connect(addr).await?;
    let mut packet = BytesMut::with_capacity(16);
    encode_cancel(key, &mut packet);
    stream.write_all(&packet).await?;
    stream.shutdown().await
}

impl CancelHandle {
    /// The key given to the client in BackendKeyData.
    pub fn key(&self) -> CancelKey {
        self.key
    }

    /// The session now runs on the backend at `addr` with `backend_key`.
    pub fn attach(&self, addr: SocketAddr, backend_key: CancelKey) {
        *lock(&self.current) = Some((addr, backend_key));
    }

    /// The session released its backend.
    pub fn detach(&self) {
        *lock(&self.current) = None;
    }
}

impl Drop for CancelHandle {
    fn drop(&mut self) {
        lock(&self.registry.sessions).remove(&self.key.pid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn keys_are_unique_checked_and_removed_with_the_session() {
        let registry = Arc::new(CancelRegistry::default());
        let a = registry.register();
        let b = registry.register();
        assert_ne!(a.key(), b.key());
        let wrong = CancelKey {
            pid: a.key().pid,
            secret: a.key().secret.wrapping_add(1),
        };
        assert_eq!(registry.cancel(wrong).await, CancelOutcome::Unknown);
        assert_eq!(registry.cancel(a.key()).await, CancelOutcome::Idle);
        let key = a.key();
        drop(a);
        assert_eq!(registry.cancel(key).await, CancelOutcome::Unknown);
        assert_eq!(registry.len(), 1);
    }

    #[tokio::test]
    async fn a_cancel_reaches_the_attached_backend_with_its_key() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let registry = Arc::new(CancelRegistry::default());
        let session = registry.register();
        let backend_key = CancelKey { pid: 42, secret: 7 };
        session.attach(addr, backend_key);
        let (outcome, received) = tokio::join!(registry.cancel(session.key()), async {
            let (mut s, _) = listener.accept().await.expect("accept");
            let mut buf = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut s, &mut buf)
                .await
                .expect("read");
            buf
        });
        assert_eq!(outcome, CancelOutcome::Forwarded);
        let mut expected = BytesMut::new();
        encode_cancel(backend_key, &mut expected);
        assert_eq!(received, expected.to_vec());
        session.detach();
        assert_eq!(registry.cancel(session.key()).await, CancelOutcome::Idle);
    }
}
