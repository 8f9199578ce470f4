//! `xlb-testsrv`: a tiny real server for integration tests and the demo.
//!
//! Every answer names the real that produced it (and the client address it saw), so a
//! test can tell which backend the balancer picked and that the client's address
//! survived the trip. Plain threads and blocking std sockets: nothing to configure, and
//! it starts in milliseconds.
//!
//! - HTTP/1.x on each `--http` address: any path answers 200 with `X-Real: NAME` and a
//!   body `NAME\nPEER_IP:PEER_PORT\n` padded with `.` to `--body-bytes`; `/health`
//!   answers `ok\n`, or `503 Service Unavailable` while the `--health-fail-file` exists
//!   (a health check's failure without stopping the service). Keep-alive unless the client asks for `Connection: close` (or speaks
//!   HTTP/1.0 without asking for keep-alive).
//! - HTTPS on each `--https` address: the same answers over TLS (rustls), with the
//!   certificate chain `--tls-cert` and key `--tls-key` (PEM files).
//! - UDP echo on each `--udp` address: every datagram is answered with `NAME ` followed by
//!   the payload.
//!
//! Prints `ready` on stdout once every socket is bound, then serves until killed.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;

/// Longest request head (request line plus headers) accepted; a bound so a broken client
/// cannot make a connection thread buffer without limit.
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Stack for per-connection threads: they only parse a request head, and load tests open
/// hundreds of connections at once.
const CONN_STACK_BYTES: usize = 128 * 1024;

#[derive(Parser, Debug)]
#[command(about = "Tiny HTTP + UDP echo real server for xlb tests")]
struct Args {
    /// Name reported in every answer (the `X-Real` header, first body line, UDP prefix).
    #[arg(long)]
    name: String,
    /// Serve HTTP on this address (repeatable). `[::]:PORT` also accepts IPv4 unless the
    /// host sets net.ipv6.bindv6only, so do not combine it with `0.0.0.0:PORT`.
    #[arg(long, value_name = "ADDR:PORT")]
    http: Vec<SocketAddr>,
    /// Serve HTTPS on this address (repeatable); needs --tls-cert and --tls-key.
    #[arg(long, value_name = "ADDR:PORT")]
    https: Vec<SocketAddr>,
    /// PEM certificate chain of the HTTPS listeners.
    #[arg(long, value_name = "PATH")]
    tls_cert: Option<std::path::PathBuf>,
    /// PEM private key of the HTTPS listeners.
    #[arg(long, value_name = "PATH")]
    tls_key: Option<std::path::PathBuf>,
    /// Serve UDP echo on this address (repeatable).
    #[arg(long, value_name = "ADDR:PORT")]
    udp: Vec<SocketAddr>,
    /// Pad HTTP bodies with '.' up to this many bytes (never truncates).
    #[arg(long, default_value_t = 0)]
    body_bytes: usize,
    /// While this file exists, `/health` answers 503 (every other path still 200).
    #[arg(long, value_name = "PATH")]
    health_fail_file: Option<std::path::PathBuf>,
}

/// What every connection thread needs; shared, never changed.
#[derive(Debug)]
struct Config {
    name: String,
    body_bytes: usize,
    health_fail_file: Option<std::path::PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.http.is_empty() && args.https.is_empty() && args.udp.is_empty() {
        bail!("nothing to serve: give at least one --http, --https or --udp address");
    }
    let tls = if args.https.is_empty() {
        None
    } else {
        Some(tls_config(
            args.tls_cert.as_deref(),
            args.tls_key.as_deref(),
        )?)
    };
    let config = Arc::new(Config {
        name: args.name,
        body_bytes: args.body_bytes,
        health_fail_file: args.health_fail_file,
    });

    // Bind everything before announcing readiness, so a test that waits for `ready`
    // never races the listeners.
    let listeners = args
        .http
        .iter()
        .map(|addr| TcpListener::bind(addr).with_context(|| format!("bind HTTP {addr}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let tls_listeners = args
        .https
        .iter()
        .map(|addr| TcpListener::bind(addr).with_context(|| format!("bind HTTPS {addr}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let udp_sockets = args
        .udp
        .iter()
        .map(|addr| UdpSocket::bind(addr).with_context(|| format!("bind UDP {addr}")))
        .collect::<anyhow::Result<Vec<_>>>()?;

    let mut workers = Vec::new();
    for listener in listeners {
        let config = Arc::clone(&config);
        workers.push(thread::spawn(move || accept_loop(&listener, &config, None)));
    }
    for listener in tls_listeners {
        let config = Arc::clone(&config);
        let tls = tls.clone();
        workers.push(thread::spawn(move || accept_loop(&listener, &config, tls)));
    }
    for socket in udp_sockets {
        let config = Arc::clone(&config);
        workers.push(thread::spawn(move || udp_echo(&socket, &config)));
    }

    let mut stdout = io::stdout().lock();
    writeln!(stdout, "ready").context("write ready line")?;
    stdout.flush().context("flush ready line")?;
    drop(stdout);

    for worker in workers {
        // The loops never return; a join only ends if one panicked.
        if worker.join().is_err() {
            bail!("a server thread panicked");
        }
    }
    Ok(())
}

/// The TLS settings of the HTTPS listeners, from PEM files.
fn tls_config(
    cert: Option<&std::path::Path>,
    key: Option<&std::path::Path>,
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
    let (Some(cert), Some(key)) = (cert, key) else {
        bail!("--https needs --tls-cert and --tls-key");
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .with_context(|| format!("read certificates from {}", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("read the key from {}", key.display()))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS versions")?
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .context("TLS certificate and key")?;
    Ok(Arc::new(config))
}

/// Accepts connections forever, one thread each; over TLS with `tls`.
fn accept_loop(
    listener: &TcpListener,
    config: &Arc<Config>,
    tls: Option<Arc<rustls::ServerConfig>>,
) {
    loop {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Usually EMFILE under a load test; back off instead of spinning.
                eprintln!("accept: {e}");
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let config = Arc::clone(config);
        let tls = tls.clone();
        let spawned = thread::Builder::new()
            .stack_size(CONN_STACK_BYTES)
            .spawn(move || {
                let served = match tls {
                    None => serve_connection(stream, &config),
                    Some(tls) => serve_tls(stream, tls, &config),
                };
                if let Err(e) = served {
                    report_connection_error(&e);
                }
            });
        if let Err(e) = spawned {
            eprintln!("spawn connection thread: {e}");
        }
    }
}

/// Clients resetting or vanishing mid-request is normal under load (and what a health
/// check's connect-and-reset does: gone before its peer address is read); anything else
/// is worth a line on stderr.
fn report_connection_error(e: &io::Error) {
    use io::ErrorKind::{
        BrokenPipe, ConnectionAborted, ConnectionReset, NotConnected, UnexpectedEof,
    };
    if !matches!(
        e.kind(),
        BrokenPipe | ConnectionAborted | ConnectionReset | NotConnected | UnexpectedEof
    ) {
        eprintln!("connection: {e}");
    }
}

/// The parts of a request this server looks at.
#[derive(Debug)]
struct Request {
    method: String,
    path: String,
    keep_alive: bool,
}

/// Serves requests on one connection until the client closes it or asks to.
fn serve_connection(stream: TcpStream, config: &Config) -> io::Result<()> {
    let peer = canonical(stream.peer_addr()?);
    // One write per response, but keep-alive clients wait for each answer: don't let
    // Nagle hold a response back for the client's delayed ACK.
    stream.set_nodelay(true)?;
    serve(stream, peer, config)
}

/// Serves requests over TLS on one connection.
fn serve_tls(stream: TcpStream, tls: Arc<rustls::ServerConfig>, config: &Config) -> io::Result<()> {
    let peer = canonical(stream.peer_addr()?);
    stream.set_nodelay(true)?;
    let session = rustls::ServerConnection::new(tls).map_err(io::Error::other)?;
    let mut stream = rustls::StreamOwned::new(session, stream);
    serve(&mut stream, peer, config)?;
    stream.conn.send_close_notify();
    stream.flush()
}

/// Serves requests on `stream` (plain or TLS) until the client closes it or asks to.
fn serve<S: Read + Write>(stream: S, peer: SocketAddr, config: &Config) -> io::Result<()> {
    let mut reader = BufReader::new(stream);
    loop {
        let request = match read_request(&mut reader) {
            Ok(Some(request)) => request,
            Ok(None) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                let body = format!("{e}\n");
                let response = response("400 Bad Request", &config.name, false, body.as_bytes());
                reader.get_mut().write_all(&response)?;
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let failing = config.health_fail_file.as_ref().is_some_and(|f| f.exists());
        let (status, body) = match request.path.as_str() {
            "/health" if failing => ("503 Service Unavailable", b"failing\n".to_vec()),
            "/health" => ("200 OK", b"ok\n".to_vec()),
            _ => ("200 OK", identity_body(config, peer)),
        };
        let body: &[u8] = if request.method == "HEAD" { b"" } else { &body };
        reader
            .get_mut()
            .write_all(&response(status, &config.name, request.keep_alive, body))?;
        if !request.keep_alive {
            return Ok(());
        }
    }
}

/// IPv4 clients of a `[::]` listener show up as `::ffff:a.b.c.d`; report them as the
/// IPv4 address they are, so answers read the same whatever the listener.
fn canonical(peer: SocketAddr) -> SocketAddr {
    match peer {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::from((v4, v6.port())),
            None => peer,
        },
        SocketAddr::V4(_) => peer,
    }
}

/// `NAME\nPEER\n`, padded with '.' to the configured size.
fn identity_body(config: &Config, peer: SocketAddr) -> Vec<u8> {
    let mut body = format!("{}\n{peer}\n", config.name).into_bytes();
    if body.len() < config.body_bytes {
        body.resize(config.body_bytes, b'.');
    }
    body
}

/// A complete response: status line, headers, body.
fn response(status: &str, name: &str, keep_alive: bool, body: &[u8]) -> Vec<u8> {
    // HTTP/1.0 clients only keep the connection if told so; 1.1 clients assume it.
    let connection = if keep_alive { "keep-alive" } else { "close" };
    let mut out = format!(
        "HTTP/1.1 {status}\r\nX-Real: {name}\r\nContent-Type: text/plain\r\n\
         Content-Length: {}\r\nConnection: {connection}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

/// Reads one request head (and skips its body, if it declares one). `Ok(None)` when the
/// client closed the connection between requests; `InvalidData` for a malformed request.
fn read_request(reader: &mut impl BufRead) -> io::Result<Option<Request>> {
    let mut head_bytes = 0;
    let mut line = String::new();
    if !read_head_line(reader, &mut line, &mut head_bytes)? {
        return Ok(None);
    }
    let mut parts = line.split_whitespace();
    let (Some(method), Some(path), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(invalid(format!("bad request line {:?}", line.trim_end())));
    };
    let (method, path) = (method.to_owned(), path.to_owned());
    let mut keep_alive = match version {
        "HTTP/1.1" => true,
        "HTTP/1.0" => false,
        other => return Err(invalid(format!("unsupported version {other:?}"))),
    };
    let mut content_length = 0u64;
    loop {
        line.clear();
        if !read_head_line(reader, &mut line, &mut head_bytes)? {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let header = line.trim_end_matches(['\r', '\n']);
        if header.is_empty() {
            break;
        }
        let Some((field, value)) = header.split_once(':') else {
            return Err(invalid(format!("bad header line {header:?}")));
        };
        let value = value.trim();
        if field.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    keep_alive = false;
                } else if token.eq_ignore_ascii_case("keep-alive") {
                    keep_alive = true;
                }
            }
        } else if field.eq_ignore_ascii_case("content-length") {
            content_length = value
                .parse()
                .map_err(|_| invalid(format!("bad Content-Length {value:?}")))?;
        } else if field.eq_ignore_ascii_case("transfer-encoding") {
            return Err(invalid(
                "chunked request bodies are not supported".to_owned(),
            ));
        }
    }
    // A request body is never used, but must be consumed so the next request on a
    // kept-alive connection starts at the right byte.
    let skipped = io::copy(&mut reader.take(content_length), &mut io::sink())?;
    if skipped < content_length {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(Some(Request {
        method,
        path,
        keep_alive,
    }))
}

/// Appends one line of the request head to `line`, enforcing [`MAX_HEAD_BYTES`] over the
/// whole head. `Ok(false)` at end of stream.
fn read_head_line(
    reader: &mut impl BufRead,
    line: &mut String,
    head_bytes: &mut usize,
) -> io::Result<bool> {
    let budget = MAX_HEAD_BYTES.saturating_sub(*head_bytes);
    let limit = u64::try_from(budget).unwrap_or(u64::MAX);
    let n = reader.take(limit).read_line(line)?;
    if n == 0 {
        return if budget == 0 {
            Err(invalid(format!("request head over {MAX_HEAD_BYTES} bytes")))
        } else {
            Ok(false)
        };
    }
    *head_bytes += n;
    if !line.ends_with('\n') {
        return if *head_bytes >= MAX_HEAD_BYTES {
            Err(invalid(format!("request head over {MAX_HEAD_BYTES} bytes")))
        } else {
            // The client closed mid-line.
            Err(io::ErrorKind::UnexpectedEof.into())
        };
    }
    Ok(true)
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

/// Answers every datagram with `NAME ` and the payload, forever.
fn udp_echo(socket: &UdpSocket, config: &Config) {
    let mut buf = vec![0u8; 65_536];
    let mut reply = Vec::with_capacity(buf.len() + config.name.len() + 1);
    loop {
        let (n, peer) = match socket.recv_from(&mut buf) {
            Ok(got) => got,
            Err(e) => {
                eprintln!("udp recv: {e}");
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        reply.clear();
        reply.extend_from_slice(config.name.as_bytes());
        reply.push(b' ');
        reply.extend_from_slice(&buf[..n]);
        if let Err(e) = socket.send_to(&reply, peer) {
            eprintln!("udp send to {peer}: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &str) -> io::Result<Option<Request>> {
        read_request(&mut BufReader::new(raw.as_bytes()))
    }

    #[test]
    fn http11_keeps_alive_unless_asked_to_close() {
        let r = parse("GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap().unwrap();
        assert!(r.keep_alive);
        let r = parse("GET / HTTP/1.1\r\nConnection: Close\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!r.keep_alive);
    }

    #[test]
    fn http10_closes_unless_asked_to_keep_alive() {
        let r = parse("GET /health HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert!(!r.keep_alive);
        assert_eq!(r.path, "/health");
        let r = parse("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(r.keep_alive);
    }

    #[test]
    fn request_body_is_skipped_so_the_next_request_parses() {
        let raw = "POST /a HTTP/1.1\r\nContent-Length: 5\r\n\r\nhelloGET /b HTTP/1.1\r\n\r\n";
        let mut reader = BufReader::new(raw.as_bytes());
        assert_eq!(read_request(&mut reader).unwrap().unwrap().path, "/a");
        assert_eq!(read_request(&mut reader).unwrap().unwrap().path, "/b");
        assert!(read_request(&mut reader).unwrap().is_none());
    }

    #[test]
    fn garbage_and_oversized_heads_are_invalid() {
        let e = parse("HELLO\r\n\r\n").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        let huge = format!(
            "GET / HTTP/1.1\r\nX: {}\r\n\r\n",
            "a".repeat(MAX_HEAD_BYTES)
        );
        assert_eq!(parse(&huge).unwrap_err().kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn body_names_the_real_and_the_peer_and_is_padded() {
        let config = Config {
            name: "rs1".to_owned(),
            body_bytes: 40,
            health_fail_file: None,
        };
        let peer = canonical("[::ffff:198.51.100.2]:4000".parse().unwrap());
        let body = identity_body(&config, peer);
        assert_eq!(body.len(), 40);
        assert!(body.starts_with(b"rs1\n198.51.100.2:4000\n..."));
    }
}
