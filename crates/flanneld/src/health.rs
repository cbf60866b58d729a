//! The health endpoint: `/healthz` (alive) and `/readyz` (lease, rules and subnet.env done).
//!
//! Bodies and status codes are the reference's, since liveness/readiness probes in existing
//! manifests depend on them. A tiny hand-written HTTP/1.1 responder is enough for two paths.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Shared readiness flag, set once subnet.env is written.
#[derive(Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    /// Marks the daemon ready.
    pub fn set_ready(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Whether the daemon is ready.
    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// The response for a request path: status line and body.
pub fn respond(path: &str, ready: bool) -> (&'static str, &'static str) {
    match path {
        "/healthz" => ("200 OK", "flanneld is running"),
        "/readyz" if ready => ("200 OK", "flanneld is ready"),
        "/readyz" => ("503 Service Unavailable", "flanneld is not ready yet"),
        _ => ("404 Not Found", "404 page not found\n"),
    }
}

/// Binds the health server; fails (so the daemon exits) if the address is unusable.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves health requests until the task is dropped.
pub async fn serve(listener: TcpListener, readiness: Readiness) {
    loop {
        let mut sock = match listener.accept().await {
            Ok((sock, _)) => sock,
            Err(e) => {
                // e.g. out of file descriptors: back off instead of spinning.
                tracing::warn!("health server: accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let readiness = readiness.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut len = 0;
            // Read until the end of the request head (or the buffer is full).
            loop {
                match sock.read(&mut buf[len..]).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        len += n;
                        if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") || len == buf.len() {
                            break;
                        }
                    }
                }
            }
            let head = String::from_utf8_lossy(&buf[..len]);
            let target = head.split_whitespace().nth(1).unwrap_or("/");
            let path = target.split('?').next().unwrap_or("/");
            let (status, body) = respond(path, readiness.is_ready());
            let reply = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(reply.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}
