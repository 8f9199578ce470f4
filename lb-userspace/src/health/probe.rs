//! The probes. Each returns `Ok(())` or a short operator-facing reason
//! ("connection refused", "HTTP 503", "no answer"); the caller bounds it
//! with the check's timeout.

use std::net::SocketAddr;

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpStream, UdpSocket},
};

use super::{HealthCheck, ProbeKind};

/// Largest HTTP answer read (status line, headers and the start of the body).
const HTTP_READ_MAX: usize = 64 * 1024;

/// Runs one probe of kind `check.kind` against `target`.
pub async fn run(check: &HealthCheck, target: SocketAddr) -> Result<(), String> {
    match check.kind {
        ProbeKind::Tcp => tcp(target).await,
        ProbeKind::Http => http(check, target).await,
        ProbeKind::Udp => udp(check, target).await,
        ProbeKind::None => Ok(()),
    }
}

fn io_reason(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::ConnectionRefused => "connection refused".to_owned(),
        std::io::ErrorKind::ConnectionReset => "connection reset".to_owned(),
        _ => e.to_string(),
    }
}

async fn tcp(target: SocketAddr) -> Result<(), String> {
    let s = TcpStream::connect(target)
        .await
        .map_err(|e| io_reason(&e))?;
    drop(s);
    Ok(())
}

async fn http(check: &HealthCheck, target: SocketAddr) -> Result<(), String> {
    let (lo, hi) = check.status_range()?;
    let mut s = TcpStream::connect(target)
        .await
        .map_err(|e| io_reason(&e))?;
    let host = check.host.clone().unwrap_or_else(|| match target {
        SocketAddr::V4(a) => a.ip().to_string(),
        SocketAddr::V6(a) => format!("[{}]", a.ip()),
    });
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: xlb-health\r\nConnection: close\r\n\r\n",
        check.path
    );
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| io_reason(&e))?;
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk).await.map_err(|e| io_reason(&e))?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() >= HTTP_READ_MAX {
            break;
        }
        // Without a body check, the status line is all we need.
        if check.expect_body.is_none() && buf.windows(2).any(|w| w == b"\r\n") {
            break;
        }
    }
    let text = String::from_utf8_lossy(&buf);
    let status_line = text.lines().next().unwrap_or_default();
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("not an HTTP answer: {:.40}", status_line))?;
    if status < lo || status > hi {
        return Err(format!("HTTP {status}"));
    }
    if let Some(want) = &check.expect_body {
        let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        if !body.contains(want.as_str()) {
            return Err(format!("HTTP {status} without '{want}' in the body"));
        }
    }
    Ok(())
}

async fn udp(check: &HealthCheck, target: SocketAddr) -> Result<(), String> {
    let bind: SocketAddr = match target {
        SocketAddr::V4(_) => "0.0.0.0:0".parse().map_err(|_| "bind".to_owned())?,
        SocketAddr::V6(_) => "[::]:0".parse().map_err(|_| "bind".to_owned())?,
    };
    let sock = UdpSocket::bind(bind).await.map_err(|e| io_reason(&e))?;
    sock.connect(target).await.map_err(|e| io_reason(&e))?;
    let payload = check
        .send
        .clone()
        .unwrap_or_else(|| "xlb-health".to_owned());
    sock.send(payload.as_bytes())
        .await
        .map_err(|e| io_reason(&e))?;
    let mut buf = [0u8; 2048];
    // An ICMP port unreachable surfaces here as "connection refused".
    let n = sock.recv(&mut buf).await.map_err(|e| io_reason(&e))?;
    if let Some(want) = &check.expect {
        let got = String::from_utf8_lossy(&buf[..n]);
        if !got.contains(want.as_str()) {
            return Err(format!("answer without '{want}'"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    async fn http_server(answer: &'static str) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(answer.as_bytes()).await;
            }
        });
        addr
    }

    fn check(kind: ProbeKind) -> HealthCheck {
        HealthCheck {
            kind,
            ..HealthCheck::default()
        }
    }

    #[tokio::test]
    async fn http_probe_checks_status_and_body() {
        let ok = http_server("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
        let bad = http_server("HTTP/1.1 503 Service Unavailable\r\n\r\n").await;
        assert_eq!(run(&check(ProbeKind::Http), ok).await, Ok(()));
        assert_eq!(
            run(&check(ProbeKind::Http), bad).await,
            Err("HTTP 503".to_owned())
        );
        let body = HealthCheck {
            expect_body: Some("healthy".to_owned()),
            ..check(ProbeKind::Http)
        };
        let err = run(&body, ok).await.expect_err("body lacks the text");
        assert!(err.contains("without 'healthy'"), "{err}");
        // The tcp probe would pass against the 503 server.
        assert_eq!(run(&check(ProbeKind::Tcp), bad).await, Ok(()));
    }

    #[tokio::test]
    async fn tcp_probe_reports_refused() {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        drop(l);
        assert_eq!(
            run(&check(ProbeKind::Tcp), addr).await,
            Err("connection refused".to_owned())
        );
    }

    #[tokio::test]
    async fn udp_probe_needs_an_answer_with_the_text() {
        let server = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let addr = server.local_addr().expect("addr");
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            while let Ok((n, peer)) = server.recv_from(&mut buf).await {
                let mut answer = b"pong ".to_vec();
                answer.extend_from_slice(&buf[..n]);
                let _ = server.send_to(&answer, peer).await;
            }
        });
        let c = HealthCheck {
            send: Some("ping".to_owned()),
            expect: Some("pong ping".to_owned()),
            ..check(ProbeKind::Udp)
        };
        assert_eq!(run(&c, addr).await, Ok(()));
        let c = HealthCheck {
            expect: Some("nope".to_owned()),
            ..c
        };
        assert!(run(&c, addr).await.is_err());
    }
}
