//! The probes. Each returns `Ok(())` or a short operator-facing reason
//! ("connection refused", "HTTP 503", "no answer"); the caller bounds it
//! with the check's timeout, which covers every step (connect, TLS
//! handshake, request, answer, body; a command's run).
//!
//! TCP connections of probes are closed with `SO_LINGER` 0: a reset instead
//! of a FIN, so probing leaves no `TIME_WAIT` socket on the balancer (what
//! keepalived and HAProxy do).

use std::{
    net::SocketAddr,
    path::Path,
    sync::{Arc, OnceLock},
};

use http_body_util::{BodyExt as _, Empty};
use hyper::{Request, body::Bytes, header};
use hyper_util::rt::TokioIo;
use rustls::{
    ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::CryptoProvider,
    pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject as _},
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpStream, UdpSocket},
};
use tokio_rustls::TlsConnector;

use super::{HealthCheck, ProbeKind, command};
use crate::model::Vip;

/// Largest part of an HTTP body read for `expect_body`.
const HTTP_READ_MAX: usize = 64 * 1024;

/// What a probe is aimed at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    /// The VIP the real serves (named to `exec` commands).
    pub vip: Vip,
    /// The real's address and the port probed.
    pub addr: SocketAddr,
}

impl Target {
    /// The `XLB_*` environment of commands about this target.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("XLB_VIP", self.vip.to_string()),
            ("XLB_VIP_ADDRESS", self.vip.addr.to_string()),
            ("XLB_VIP_PORT", self.vip.port.to_string()),
            ("XLB_VIP_PROTOCOL", self.vip.proto.to_string()),
            ("XLB_REAL_ADDRESS", self.addr.ip().to_string()),
            ("XLB_REAL_PORT", self.addr.port().to_string()),
        ]
    }
}

/// A check ready to run: its status range parsed and its TLS settings
/// loaded once, not at every probe.
pub struct Prober {
    check: HealthCheck,
    tls: Result<Option<TlsConnector>, String>,
}

impl Prober {
    /// Prepares `check`. A TLS setting that cannot be loaded (an unreadable
    /// `tls_ca`) fails every probe with the reason.
    pub fn new(check: HealthCheck) -> Self {
        let tls = match check.kind {
            ProbeKind::Https => tls_config(&check).map(|c| Some(TlsConnector::from(c))),
            _ => Ok(None),
        };
        Self { check, tls }
    }

    /// The check it runs.
    pub fn check(&self) -> &HealthCheck {
        &self.check
    }

    /// Runs one probe.
    pub async fn run(&self, target: &Target) -> Result<(), String> {
        match self.check.kind {
            ProbeKind::Tcp => tcp(target.addr).await.map(drop),
            ProbeKind::Http => http(&self.check, target.addr, None).await,
            ProbeKind::Https => {
                let tls = self.tls.as_ref().map_err(Clone::clone)?.as_ref();
                http(&self.check, target.addr, tls).await
            }
            ProbeKind::Udp => udp(&self.check, target.addr).await,
            ProbeKind::Exec => command::run(&self.check.command, &target.env(), None).await,
            ProbeKind::None => Ok(()),
        }
    }
}

/// Runs one probe of `check` against `target` (tests; the engine keeps a
/// [`Prober`] per real).
pub async fn run(check: &HealthCheck, target: &Target) -> Result<(), String> {
    Prober::new(check.clone()).run(target).await
}

fn io_reason(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::ConnectionRefused => "connection refused".to_owned(),
        std::io::ErrorKind::ConnectionReset => "connection reset".to_owned(),
        _ => e.to_string(),
    }
}

/// A TCP connection that resets instead of closing when dropped.
async fn tcp(target: SocketAddr) -> Result<TcpStream, String> {
    let s = TcpStream::connect(target)
        .await
        .map_err(|e| io_reason(&e))?;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::Linger, &linger)
        .map_err(|e| format!("SO_LINGER: {e}"))?;
    Ok(s)
}

/// The root store of the system (`/etc/ssl/certs` and the like), read once.
fn system_roots() -> Result<Arc<RootCertStore>, String> {
    static ROOTS: OnceLock<Result<Arc<RootCertStore>, String>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            let mut roots = RootCertStore::empty();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(format!(
                    "no CA certificates in the system store ({} errors); give tls_ca",
                    found.errors.len()
                ));
            }
            Ok(Arc::new(roots))
        })
        .clone()
}

fn load_ca(path: &Path) -> Result<Arc<RootCertStore>, String> {
    let bad = |e: &dyn std::fmt::Display| format!("tls_ca {}: {e}", path.display());
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(path).map_err(|e| bad(&e))? {
        roots.add(cert.map_err(|e| bad(&e))?).map_err(|e| bad(&e))?;
    }
    if roots.is_empty() {
        return Err(bad(&"no certificate in the file"));
    }
    Ok(Arc::new(roots))
}

fn tls_config(check: &HealthCheck) -> Result<Arc<ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?;
    let config = if check.tls_verify {
        let roots = match &check.tls_ca {
            Some(path) => load_ca(path)?,
            None => system_roots()?,
        };
        builder.with_root_certificates(roots).with_no_client_auth()
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
            .with_no_client_auth()
    };
    Ok(Arc::new(config))
}

/// `tls_verify: false`: any certificate is accepted; the handshake's
/// signatures are still checked (it is TLS, only not authenticated).
#[derive(Debug)]
struct NoVerify(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn hyper_reason(e: &hyper::Error) -> String {
    if e.is_parse() {
        return format!("not an HTTP answer: {e}");
    }
    if e.is_incomplete_message() {
        return "connection closed before the answer".to_owned();
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return io_reason(io);
        }
        source = s.source();
    }
    e.to_string()
}

async fn http(
    check: &HealthCheck,
    target: SocketAddr,
    tls: Option<&TlsConnector>,
) -> Result<(), String> {
    let (lo, hi) = check.status_range()?;
    let host = check.host.clone().unwrap_or_else(|| match target {
        SocketAddr::V4(a) => a.ip().to_string(),
        SocketAddr::V6(a) => format!("[{}]", a.ip()),
    });
    let req = Request::get(check.path.as_str())
        .header(header::HOST, host)
        .header(header::USER_AGENT, "xlb-health")
        .header(header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("HTTP request: {e}"))?;
    let s = tcp(target).await?;
    match tls {
        None => exchange(s, req, check, (lo, hi)).await,
        Some(tls) => {
            let name = match check.server_name() {
                Some(n) => ServerName::try_from(n.to_owned()).map_err(|e| format!("sni: {e}"))?,
                None => ServerName::IpAddress(target.ip().into()),
            };
            let s = tls
                .connect(name, s)
                .await
                .map_err(|e| format!("TLS: {e}"))?;
            exchange(s, req, check, (lo, hi)).await
        }
    }
}

/// Sends `req` on `io` and checks the answer's status and body.
async fn exchange<IO>(
    io: IO,
    req: Request<Empty<Bytes>>,
    check: &HealthCheck,
    (lo, hi): (u16, u16),
) -> Result<(), String>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| hyper_reason(&e))?;
    let work = async move {
        let answer = sender
            .send_request(req)
            .await
            .map_err(|e| hyper_reason(&e))?;
        let status = answer.status().as_u16();
        if status < lo || status > hi {
            return Err(format!("HTTP {status}"));
        }
        let Some(want) = &check.expect_body else {
            return Ok(());
        };
        let mut body = answer.into_body();
        let mut seen = Vec::new();
        while seen.len() < HTTP_READ_MAX {
            match body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        seen.extend_from_slice(&data);
                    }
                }
                Some(Err(e)) => return Err(hyper_reason(&e)),
                None => break,
            }
        }
        if String::from_utf8_lossy(&seen).contains(want.as_str()) {
            Ok(())
        } else {
            Err(format!("HTTP {status} without '{want}' in the body"))
        }
    };
    tokio::pin!(work, conn);
    tokio::select! {
        biased;
        r = &mut work => r,
        c = &mut conn => {
            c.map_err(|e| hyper_reason(&e))?;
            work.await
        }
    }
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
    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::TcpListener,
    };

    fn target(addr: SocketAddr) -> Target {
        Target {
            vip: "203.0.113.10:80/tcp".parse().expect("VIP"),
            addr,
        }
    }

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
        let ok = target(http_server("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await);
        let bad = target(
            http_server("HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n").await,
        );
        let junk = target(http_server("SSH-2.0-OpenSSH_9.2\r\n").await);
        assert_eq!(run(&check(ProbeKind::Http), &ok).await, Ok(()));
        assert_eq!(
            run(&check(ProbeKind::Http), &bad).await,
            Err("HTTP 503".to_owned())
        );
        let err = run(&check(ProbeKind::Http), &junk)
            .await
            .expect_err("not HTTP");
        assert!(err.starts_with("not an HTTP answer"), "{err}");
        let body = HealthCheck {
            expect_body: Some("healthy".to_owned()),
            ..check(ProbeKind::Http)
        };
        assert_eq!(
            run(&body, &ok).await,
            Err("HTTP 200 without 'healthy' in the body".to_owned())
        );
        let body = HealthCheck {
            expect_body: Some("ok".to_owned()),
            ..body
        };
        assert_eq!(run(&body, &ok).await, Ok(()));
        // The tcp probe would pass against the 503 server.
        assert_eq!(run(&check(ProbeKind::Tcp), &bad).await, Ok(()));
    }

    #[tokio::test]
    async fn http_probe_sends_the_path_and_host_asked_for() {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let seen = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.expect("accept");
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut buf).await.expect("read");
                head.extend_from_slice(&buf[..n]);
            }
            let _ = s.write_all(b"HTTP/1.1 204 No Content\r\n\r\n").await;
            String::from_utf8(head).expect("text")
        });
        let c = HealthCheck {
            path: "/healthz?full=1".to_owned(),
            host: Some("www.example.com".to_owned()),
            ..check(ProbeKind::Http)
        };
        assert_eq!(run(&c, &target(addr)).await, Ok(()));
        let head = seen.await.expect("server").to_lowercase();
        assert!(
            head.starts_with("get /healthz?full=1 http/1.1\r\n"),
            "{head}"
        );
        assert!(head.contains("host: www.example.com\r\n"), "{head}");
        assert!(head.contains("connection: close\r\n"), "{head}");
    }

    #[tokio::test]
    async fn tcp_probe_reports_refused_and_closes_with_a_reset() {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.expect("accept");
            let mut buf = [0u8; 16];
            s.read(&mut buf).await.map_err(|e| e.kind())
        });
        assert_eq!(run(&check(ProbeKind::Tcp), &target(addr)).await, Ok(()));
        // A FIN would read as Ok(0); SO_LINGER 0 sends a reset instead.
        assert_eq!(
            server.await.expect("server"),
            Err(std::io::ErrorKind::ConnectionReset)
        );
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        drop(l);
        assert_eq!(
            run(&check(ProbeKind::Tcp), &target(addr)).await,
            Err("connection refused".to_owned())
        );
    }

    /// An HTTPS server on 127.0.0.1 with a self-signed certificate for
    /// `xlb.test`; returns its address, the certificate (PEM) and the names
    /// clients sent (SNI).
    async fn https_server() -> (
        SocketAddr,
        String,
        Arc<std::sync::Mutex<Vec<Option<String>>>>,
    ) {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["xlb.test".to_owned()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        let pem = cert.pem();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).expect("key der"),
        )
        .expect("server config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let names = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = names.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let acceptor = acceptor.clone();
                let seen = seen.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(s).await else {
                        return;
                    };
                    let sni = tls.get_ref().1.server_name().map(str::to_owned);
                    seen.lock().expect("names").push(sni);
                    let mut buf = [0u8; 1024];
                    let _ = tls.read(&mut buf).await;
                    let _ = tls
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nsecured")
                        .await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        (addr, pem, names)
    }

    #[tokio::test]
    async fn https_probe_verifies_against_the_ca_given_and_sends_sni() {
        let (addr, pem, names) = https_server().await;
        let dir = std::env::temp_dir().join(format!("xlb-https-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, &pem).expect("write CA");
        let to = target(addr);
        let https = HealthCheck {
            sni: Some("xlb.test".to_owned()),
            expect_body: Some("secured".to_owned()),
            ..check(ProbeKind::Https)
        };

        // Verified against the system store: a self-signed certificate fails.
        let err = run(&https, &to).await.expect_err("self-signed");
        assert!(
            err.starts_with("TLS: ") && err.contains("UnknownIssuer"),
            "{err}"
        );
        // With the certificate as the CA it passes, and the name went as SNI.
        let with_ca = HealthCheck {
            tls_ca: Some(ca.clone()),
            ..https.clone()
        };
        assert_eq!(run(&with_ca, &to).await, Ok(()));
        // The certificate does not name another host.
        let other = HealthCheck {
            sni: Some("other.test".to_owned()),
            ..with_ca.clone()
        };
        let err = run(&other, &to).await.expect_err("wrong name");
        assert!(err.contains("not valid for name \"other.test\""), "{err}");
        // Without verification any certificate goes; SNI defaults to `host`.
        let unverified = HealthCheck {
            tls_verify: false,
            sni: None,
            host: Some("www.example.com".to_owned()),
            ..https.clone()
        };
        assert_eq!(run(&unverified, &to).await, Ok(()));
        // A host given as an address sends no SNI.
        let by_addr = HealthCheck {
            host: Some("127.0.0.1".to_owned()),
            ..unverified
        };
        assert_eq!(run(&by_addr, &to).await, Ok(()));
        let names = names.lock().expect("names").clone();
        assert_eq!(
            names,
            [
                Some("xlb.test".to_owned()),
                Some("www.example.com".to_owned()),
                None
            ],
            "the SNI of the handshakes that completed"
        );
        // A CA file that does not hold a certificate fails every probe, saying so.
        std::fs::write(&ca, "not a certificate").expect("write");
        let err = run(&with_ca, &to).await.expect_err("bad CA file");
        assert!(err.contains("no certificate in the file"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn exec_probe_passes_on_exit_code_zero_with_the_target_in_its_environment() {
        let c = HealthCheck {
            command: vec![
                "/bin/sh".to_owned(),
                "-c".to_owned(),
                "test \"$XLB_REAL_ADDRESS:$XLB_REAL_PORT $XLB_VIP_ADDRESS $XLB_VIP_PORT $XLB_VIP_PROTOCOL\" = \"198.51.100.11:8080 203.0.113.10 80 tcp\" || { echo \"got $XLB_REAL_ADDRESS\" >&2; exit 1; }".to_owned(),
            ],
            ..check(ProbeKind::Exec)
        };
        let up = target("198.51.100.11:8080".parse().expect("addr"));
        assert_eq!(run(&c, &up).await, Ok(()));
        let other = target("198.51.100.12:8080".parse().expect("addr"));
        assert_eq!(
            run(&c, &other).await,
            Err("exit code 1: got 198.51.100.12".to_owned())
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
        assert_eq!(run(&c, &target(addr)).await, Ok(()));
        let c = HealthCheck {
            expect: Some("nope".to_owned()),
            ..c
        };
        assert_eq!(
            run(&c, &target(addr)).await,
            Err("answer without 'nope'".to_owned())
        );
    }
}
