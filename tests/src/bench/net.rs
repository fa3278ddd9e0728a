//! The network rows: what a pod's network costs in a VM against the same CNI network under
//! runc. Per round and handler: a server pod (busybox httpd + Debian's iperf3 server), the
//! host's HTTP round trips to it (connect, request, whole response), iperf3 from the host
//! to it, and iperf3 from a second pod to it; then both pods go.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::containerd::{IPERF3, NET_IMAGE};
use crate::cri::{ContainerSpec, Cri, CriError, PodNetwork, PodSpec, log_text};

/// The iperf3 server's port in the server pod.
const IPERF_PORT: u16 = 5201;
/// The HTTP server's port in the server pod.
const HTTP_PORT: u16 = 8080;

/// Errors of one network round.
#[derive(Debug, thiserror::Error)]
pub enum NetBenchError {
    /// A CRI call failed.
    #[error("pod {pod}")]
    Cri {
        /// The pod.
        pod: String,
        /// The failed call.
        #[source]
        source: CriError,
    },
    /// The pod reported no IPv4 address.
    #[error("pod {pod} has no IPv4 address (PodSandboxStatus: {ips:?})")]
    NoAddress {
        /// The pod.
        pod: String,
        /// What it reported.
        ips: Vec<String>,
    },
    /// The server never answered.
    #[error("the server in pod {pod} at {addr} never answered")]
    NoServer {
        /// The pod.
        pod: String,
        /// Its address.
        addr: String,
        /// The last error.
        #[source]
        source: std::io::Error,
    },
    /// iperf3 failed or printed no result.
    #[error("iperf3 {what}: {reason}")]
    Iperf {
        /// Which run.
        what: String,
        /// Why.
        reason: String,
    },
    /// A round failed; what its pods left behind, taken before they were removed.
    #[error("{source}\n{evidence}")]
    Round {
        /// The failure.
        #[source]
        source: Box<NetBenchError>,
        /// The server's output and, for Carapace, every sandbox's logs and VMM metrics.
        evidence: String,
    },
}

/// What one round measured.
#[derive(Debug, Clone, PartialEq)]
pub struct NetSample {
    /// TCP throughput from the host into the pod, Mbit/s.
    pub host_to_pod_mbps: f64,
    /// TCP throughput from another pod into the pod, Mbit/s.
    pub pod_to_pod_mbps: f64,
    /// HTTP request round trips from the host, ms.
    pub rtt_ms: Vec<f64>,
}

/// How a handler's round runs.
#[derive(Debug, Clone)]
pub struct NetRun {
    /// CRI runtime handler, `carapace` or `runc`.
    pub handler: String,
    /// Where pod logs go.
    pub log_root: PathBuf,
    /// Seconds per iperf3 run.
    pub iperf_secs: u32,
    /// HTTP requests per round.
    pub requests: usize,
    /// How long a pod may take to serve or finish.
    pub timeout: Duration,
    /// Carapace's state directory, whose sandboxes' logs a failed round reports.
    pub state_dir: Option<PathBuf>,
}

impl NetRun {
    fn pod(&self, name: &str) -> PodSpec {
        PodSpec {
            name: name.to_owned(),
            namespace: "bench".into(),
            handler: self.handler.clone(),
            log_dir: self.log_root.join(name),
            privileged: false,
            network: PodNetwork::default(),
        }
    }

    /// One round; both pods are removed afterwards, also on failure.
    pub fn measure(&self, cri: &mut Cri, round: usize) -> Result<NetSample, NetBenchError> {
        let name = format!("net-srv-{}-{round}", self.handler);
        let server = self.pod(&name);
        let cri_err = |pod: &str| {
            let pod = pod.to_owned();
            move |source| NetBenchError::Cri { pod, source }
        };
        let pod_id = cri.run_pod(&server).map_err(cri_err(&name))?;
        let result = self
            .with_server(cri, &server, &pod_id, round)
            .map_err(|e| self.with_evidence(e, &server));
        let removed = cri.remove_pod(&pod_id).map_err(cri_err(&name));
        let sample = result?;
        removed?;
        Ok(sample)
    }

    /// `e` with what the round's pods show: the server container's output and every
    /// sandbox's VMM, console and fs daemon logs (tails) with its VMM metrics.
    fn with_evidence(&self, e: NetBenchError, server: &PodSpec) -> NetBenchError {
        if matches!(e, NetBenchError::Round { .. }) {
            return e;
        }
        let srv = std::fs::read_to_string(server.log_dir.join("srv.log")).unwrap_or_default();
        let mut evidence = format!(
            "--- server container output (tail)\n{}\n",
            tail_lines(&srv, 40)
        );
        if let Some(state) = &self.state_dir {
            evidence.push_str(&crate::containerd::sandbox_log_tails(state, 60));
        }
        NetBenchError::Round {
            source: Box::new(e),
            evidence,
        }
    }

    fn with_server(
        &self,
        cri: &mut Cri,
        server: &PodSpec,
        pod_id: &str,
        round: usize,
    ) -> Result<NetSample, NetBenchError> {
        let cri_err = |source| NetBenchError::Cri {
            pod: server.name.clone(),
            source,
        };
        let ips = cri.pod_ips(pod_id).map_err(cri_err)?;
        let ip = ips
            .iter()
            .find(|a| a.parse::<std::net::Ipv4Addr>().is_ok())
            .cloned()
            .ok_or_else(|| NetBenchError::NoAddress {
                pod: server.name.clone(),
                ips: ips.clone(),
            })?;
        let srv = ContainerSpec {
            name: "srv".into(),
            image: NET_IMAGE.into(),
            command: vec![
                "sh".into(),
                "-c".into(),
                // The bench waits for HTTP, then runs iperf3 clients at once: httpd starts
                // only when iperf3 listens (its port in LISTEN state, 0A, in the kernel's
                // tables), or a quick client may find nothing there yet.
                format!(
                    "mkdir -p /tmp/www && echo ok > /tmp/www/index.html && \
                     iperf3 -s -p {IPERF_PORT} & \
                     until grep -q ':{IPERF_PORT:04X} [0-9A-F:]* 0A' /proc/net/tcp /proc/net/tcp6 \
                     2>/dev/null; do sleep 0.1; done; \
                     exec busybox httpd -f -p {HTTP_PORT} -h /tmp/www"
                ),
            ],
            ..Default::default()
        };
        let id = cri
            .create_container(pod_id, server, &srv)
            .map_err(cri_err)?;
        cri.start_container(&id).map_err(cri_err)?;
        let http = format!("{ip}:{HTTP_PORT}");
        crate::net::http_get(&http, self.timeout).map_err(|source| NetBenchError::NoServer {
            pod: server.name.clone(),
            addr: http.clone(),
            source,
        })?;
        let mut rtt_ms = Vec::with_capacity(self.requests);
        for _ in 0..self.requests {
            let t = Instant::now();
            crate::net::http_get(&http, Duration::from_secs(10)).map_err(|source| {
                NetBenchError::NoServer {
                    pod: server.name.clone(),
                    addr: http.clone(),
                    source,
                }
            })?;
            rtt_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        let host_to_pod_mbps = self.iperf_from_host(&ip)?;
        let pod_to_pod_mbps = self.iperf_from_pod(cri, &ip, round)?;
        Ok(NetSample {
            host_to_pod_mbps,
            pod_to_pod_mbps,
            rtt_ms,
        })
    }

    fn iperf_from_host(&self, ip: &str) -> Result<f64, NetBenchError> {
        let what = format!("host -> {ip} ({})", self.handler);
        let out = Command::new(IPERF3)
            .args(["-c", ip, "-p", &IPERF_PORT.to_string(), "-J", "-t"])
            .arg(self.iperf_secs.to_string())
            .output()
            .map_err(|e| NetBenchError::Iperf {
                what: what.clone(),
                reason: e.to_string(),
            })?;
        received_mbps(&String::from_utf8_lossy(&out.stdout))
            .map_err(|reason| NetBenchError::Iperf { what, reason })
    }

    fn iperf_from_pod(&self, cri: &mut Cri, ip: &str, round: usize) -> Result<f64, NetBenchError> {
        let name = format!("net-cli-{}-{round}", self.handler);
        let client = self.pod(&name);
        let cri_err = |source| NetBenchError::Cri {
            pod: name.clone(),
            source,
        };
        let pod_id = cri.run_pod(&client).map_err(cri_err)?;
        let run = (|| -> Result<f64, NetBenchError> {
            let spec = ContainerSpec {
                name: "cli".into(),
                image: NET_IMAGE.into(),
                command: vec![
                    "sh".into(),
                    "-c".into(),
                    format!(
                        "iperf3 -c {ip} -p {IPERF_PORT} -J -t {}; exit 0",
                        self.iperf_secs
                    ),
                ],
                ..Default::default()
            };
            let id = cri
                .create_container(&pod_id, &client, &spec)
                .map_err(cri_err)?;
            cri.start_container(&id).map_err(cri_err)?;
            let code = cri.wait_exited(&id, self.timeout).map_err(cri_err)?;
            let log = log_text(&log_path(&client.log_dir)).map_err(cri_err)?;
            received_mbps(&log).map_err(|reason| NetBenchError::Iperf {
                what: format!("pod -> {ip} ({})", self.handler),
                reason: format!(
                    "{reason}\n--- client container (exit {code}) output (tail)\n{}",
                    tail_lines(&log, 40)
                ),
            })
        })();
        // The client pod's sandbox logs are in the evidence only while it exists.
        let run = run.map_err(|e| {
            self.with_evidence(e, &self.pod(&format!("net-srv-{}-{round}", self.handler)))
        });
        let removed = cri.remove_pod(&pod_id).map_err(cri_err);
        let mbps = run?;
        removed?;
        Ok(mbps)
    }
}

fn log_path(dir: &Path) -> PathBuf {
    dir.join("cli.log")
}

/// The receiver's throughput (Mbit/s) from iperf3's `-J` output, which may be preceded or
/// followed by other text.
pub fn received_mbps(text: &str) -> Result<f64, String> {
    let (Some(start), Some(end)) = (text.find('{'), text.rfind('}')) else {
        return Err(format!("no JSON in its output: {}", tail(text)));
    };
    let v: serde_json::Value = serde_json::from_str(&text[start..=end])
        .map_err(|e| format!("{e} in its output: {}", tail(text)))?;
    if let Some(err) = v.get("error").and_then(|e| e.as_str()) {
        return Err(err.to_owned());
    }
    v.pointer("/end/sum_received/bits_per_second")
        .and_then(serde_json::Value::as_f64)
        .map(|bps| bps / 1e6)
        .ok_or_else(|| format!("no end.sum_received.bits_per_second: {}", tail(text)))
}

/// The last `n` lines of `text`.
fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn tail(text: &str) -> String {
    let t: String = text.chars().rev().take(300).collect();
    t.chars().rev().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iperf_json_gives_the_receivers_throughput_or_its_error() {
        let out = r#"some banner
{"start": {}, "end": {"sum_sent": {"bits_per_second": 2.0e9},
 "sum_received": {"bits_per_second": 1.5e9}}}
"#;
        assert_eq!(received_mbps(out).unwrap(), 1500.0);
        let err =
            received_mbps(r#"{"start": {}, "error": "unable to connect to server"}"#).unwrap_err();
        assert!(err.contains("unable to connect"), "{err}");
        assert!(received_mbps("iperf3: not found").is_err());
    }
}
