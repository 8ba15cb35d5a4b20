//! Tunnels: an upgraded connection (WebSocket or another upgrade a route
//! allows) or a CONNECT tunnel, copied both ways until either side closes
//! or no byte moves for the idle timeout.
//!
//! A tunnel is still the downstream connection it grew from: it keeps that
//! connection counted (`outrigger_connections`, `max_connections`) and the
//! drain waiting for it, holds its cluster's request and connection
//! permits, and is counted in `outrigger_tunnels` against the listener's
//! `max_tunnels`. All of that is `hold`, dropped when the tunnel ends.

use prometheus::IntGauge;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const BUF: usize = 16 * 1024;

/// Counts a tunnel in its listener's gauge while it runs.
pub struct TunnelGuard(IntGauge);

impl TunnelGuard {
    pub fn new(gauge: IntGauge) -> Self {
        gauge.inc();
        TunnelGuard(gauge)
    }
}

impl Drop for TunnelGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Copies `down` ⇄ `up` until the upstream closes, an error, or `idle`
/// without a byte either way. A client that closes its side (half-close)
/// still gets what the upstream sends back. Returns the bytes copied
/// (down→up, up→down).
pub async fn run<D, U, H>(down: D, up: U, idle: Duration, hold: H) -> (u64, u64)
where
    D: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (mut dr, mut dw) = tokio::io::split(down);
    let (mut ur, mut uw) = tokio::io::split(up);
    let mut to_up = vec![0u8; BUF];
    let mut to_down = vec![0u8; BUF];
    let (mut sent, mut received) = (0u64, 0u64);
    let mut down_open = true;
    let timer = tokio::time::sleep(idle);
    tokio::pin!(timer);
    loop {
        tokio::select! {
            r = dr.read(&mut to_up), if down_open => match r {
                Ok(n) if n > 0 => {
                    if !matches!(tokio::time::timeout(idle, uw.write_all(&to_up[..n])).await, Ok(Ok(()))) {
                        break;
                    }
                    sent += n as u64;
                }
                _ => {
                    down_open = false;
                    let _ = uw.shutdown().await;
                }
            },
            r = ur.read(&mut to_down) => match r {
                Ok(n) if n > 0 => {
                    if !matches!(tokio::time::timeout(idle, dw.write_all(&to_down[..n])).await, Ok(Ok(()))) {
                        break;
                    }
                    received += n as u64;
                }
                // The upstream is done: so is the tunnel (a WebSocket server
                // closing, a CONNECT target hanging up).
                _ => {
                    let _ = dw.shutdown().await;
                    break;
                }
            },
            _ = &mut timer => {
                tracing::debug!(?idle, "tunnel idle; closing");
                break;
            }
        }
        timer.as_mut().reset(tokio::time::Instant::now() + idle);
    }
    drop(hold);
    (sent, received)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn an_idle_tunnel_is_closed_and_an_active_one_is_not() {
        let (client, proxy_down) = tokio::io::duplex(1024);
        let (proxy_up, mut server) = tokio::io::duplex(1024);
        let gauge = IntGauge::new("tunnel_test", "t").unwrap();
        let guard = TunnelGuard::new(gauge.clone());
        let task = tokio::spawn(run(proxy_down, proxy_up, Duration::from_secs(10), guard));
        let mut client = client;
        for _ in 0..5 {
            tokio::time::advance(Duration::from_secs(8)).await;
            client.write_all(b"ping").await.unwrap();
            let mut buf = [0u8; 4];
            server.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"ping");
        }
        assert_eq!(gauge.get(), 1, "40 s of traffic every 8 s: still open");
        tokio::time::advance(Duration::from_secs(11)).await;
        let (sent, _) = task.await.unwrap();
        assert_eq!(sent, 20);
        assert_eq!(gauge.get(), 0, "closed after 10 s of silence");
    }
}
