//! Network helpers for the pod networking tests and benchmarks.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::containerd::BUSYBOX_IMAGE;
use crate::cri::ContainerSpec;

/// A container `web` serving `body` as `/` over HTTP on `port` (busybox httpd in the
/// foreground), what the pod networking tests fetch.
pub fn web_server(body: &str, port: u16) -> ContainerSpec {
    ContainerSpec {
        name: "web".into(),
        image: BUSYBOX_IMAGE.into(),
        command: vec![
            "sh".into(),
            "-c".into(),
            format!(
                "mkdir -p /tmp/www && echo {body} > /tmp/www/index.html && \
                 exec busybox httpd -f -p {port} -h /tmp/www"
            ),
        ],
        ..Default::default()
    }
}

/// `GET /` from `addr` (`ip:port`) over HTTP/1.0, retried until `timeout` (the server may
/// still be starting); returns the whole response.
pub fn http_get(addr: &str, timeout: Duration) -> std::io::Result<String> {
    let addr: SocketAddr = addr.parse().map_err(|e| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{addr}: {e}"))
    })?;
    let deadline = Instant::now() + timeout;
    loop {
        match get_once(addr) {
            Ok(r) => return Ok(r),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

fn get_once(addr: SocketAddr) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: test\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    if out.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "empty response",
        ));
    }
    Ok(out)
}
