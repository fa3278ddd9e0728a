//! Connecting to the agent: hybrid-vsock handshake, plain unix socket, version check.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::PROTOCOL_VERSION;
use crate::agent::VersionRequest;
use crate::agent_ttrpc::AgentClient;

/// Longest `OK <n>\n` line accepted from the VMM's hybrid-vsock socket.
const MAX_HANDSHAKE_LINE: usize = 64;

/// Errors while connecting to the agent.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connecting to agent socket {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("hybrid-vsock handshake on {path} (CONNECT {port})")]
    HandshakeIo {
        path: PathBuf,
        port: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("hybrid-vsock handshake on {path} (CONNECT {port}): unexpected reply {reply:?}")]
    HandshakeReply {
        path: PathBuf,
        port: u32,
        reply: String,
    },
    #[error("timed out after {timeout:?} during {what}")]
    Timeout {
        what: &'static str,
        timeout: Duration,
    },
    #[error("agent Version RPC failed")]
    VersionRpc {
        #[source]
        source: ttrpc::Error,
    },
    #[error(
        "incompatible guest agent: agent {agent_version} speaks protocol {agent_protocol}, \
         this host speaks protocol {host_protocol}; rebuild the guest image with a matching carapace-agent"
    )]
    IncompatibleAgent {
        agent_version: String,
        agent_protocol: u32,
        host_protocol: u32,
    },
}

/// Version information reported by a compatible agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentInfo {
    pub agent_version: String,
    pub protocol_version: u32,
}

/// Connects to the VMM's hybrid-vsock unix socket `uds`, asks for guest `port`
/// (`CONNECT <port>\n`, expects `OK <n>\n`) and returns the stream, now connected to the
/// guest port.
pub async fn hybrid_vsock_connect(
    uds: &Path,
    port: u32,
    timeout: Duration,
) -> Result<UnixStream, ClientError> {
    let fut = async {
        let mut stream = UnixStream::connect(uds)
            .await
            .map_err(|source| ClientError::Connect {
                path: uds.to_owned(),
                source,
            })?;
        let io_err = |source| ClientError::HandshakeIo {
            path: uds.to_owned(),
            port,
            source,
        };
        stream
            .write_all(format!("CONNECT {port}\n").as_bytes())
            .await
            .map_err(io_err)?;
        // Read byte by byte: nothing after the newline belongs to the handshake.
        let mut line = Vec::with_capacity(MAX_HANDSHAKE_LINE);
        loop {
            let mut byte = [0u8; 1];
            let n = stream.read(&mut byte).await.map_err(io_err)?;
            if n == 0 || line.len() >= MAX_HANDSHAKE_LINE {
                return Err(ClientError::HandshakeReply {
                    path: uds.to_owned(),
                    port,
                    reply: String::from_utf8_lossy(&line).into_owned(),
                });
            }
            if byte[0] == b'\n' {
                break;
            }
            line.push(byte[0]);
        }
        let reply = String::from_utf8_lossy(&line).into_owned();
        let ok = reply
            .strip_prefix("OK ")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        if !ok {
            return Err(ClientError::HandshakeReply {
                path: uds.to_owned(),
                port,
                reply,
            });
        }
        Ok(stream)
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| ClientError::Timeout {
            what: "hybrid-vsock connect",
            timeout,
        })?
}

/// Checks the agent's protocol version; errors with [`ClientError::IncompatibleAgent`]
/// on mismatch.
pub async fn check_version(
    client: &AgentClient,
    timeout: Duration,
) -> Result<AgentInfo, ClientError> {
    let req = VersionRequest {
        host_protocol_version: PROTOCOL_VERSION,
        ..Default::default()
    };
    let ctx = ttrpc::context::with_timeout(i64::try_from(timeout.as_nanos()).unwrap_or(i64::MAX));
    let resp = client
        .version(ctx, &req)
        .await
        .map_err(|source| ClientError::VersionRpc { source })?;
    check_compatible(&resp.agent_version, resp.protocol_version)
}

/// The pure compatibility rule: the protocol versions must be equal.
pub fn check_compatible(agent_version: &str, protocol: u32) -> Result<AgentInfo, ClientError> {
    if protocol != PROTOCOL_VERSION {
        return Err(ClientError::IncompatibleAgent {
            agent_version: agent_version.to_owned(),
            agent_protocol: protocol,
            host_protocol: PROTOCOL_VERSION,
        });
    }
    Ok(AgentInfo {
        agent_version: agent_version.to_owned(),
        protocol_version: protocol,
    })
}

fn client_over(stream: UnixStream) -> AgentClient {
    AgentClient::new(ttrpc::r#async::Client::new(
        ttrpc::r#async::transport::Socket::from(stream),
    ))
}

/// Connects through the VMM's hybrid-vsock socket to the agent on guest port 1024 and
/// checks its version. Must be called inside a tokio runtime.
pub async fn connect_hybrid_vsock(
    uds: &Path,
    timeout: Duration,
) -> Result<(AgentClient, AgentInfo), ClientError> {
    let stream = hybrid_vsock_connect(uds, crate::AGENT_VSOCK_PORT, timeout).await?;
    let client = client_over(stream);
    let info = check_version(&client, timeout).await?;
    Ok((client, info))
}

/// Connects to an agent in host mode listening on the unix socket `path` and checks its
/// version. Must be called inside a tokio runtime.
pub async fn connect_unix(
    path: &Path,
    timeout: Duration,
) -> Result<(AgentClient, AgentInfo), ClientError> {
    let stream = tokio::time::timeout(timeout, UnixStream::connect(path))
        .await
        .map_err(|_| ClientError::Timeout {
            what: "unix connect",
            timeout,
        })?
        .map_err(|source| ClientError::Connect {
            path: path.to_owned(),
            source,
        })?;
    let client = client_over(stream);
    let info = check_version(&client, timeout).await?;
    Ok((client, info))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    #[test]
    fn mismatched_protocol_is_refused_with_both_versions_named() {
        let err = check_compatible("9.9.9", PROTOCOL_VERSION + 1).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("incompatible guest agent"), "{msg}");
        assert!(
            msg.contains(&format!("protocol {}", PROTOCOL_VERSION + 1)),
            "{msg}"
        );
        assert!(msg.contains("9.9.9"), "{msg}");
        assert!(check_compatible("1.0", PROTOCOL_VERSION).is_ok());
    }

    async fn fake_vmm(
        reply: &'static [u8],
    ) -> (tempfile::TempDir, PathBuf, tokio::task::JoinHandle<Vec<u8>>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vsock.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let task = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut got = vec![0u8; 13];
            s.read_exact(&mut got).await.unwrap();
            s.write_all(reply).await.unwrap();
            // Payload after the handshake must reach the peer untouched.
            s.write_all(b"payload").await.unwrap();
            got
        });
        (dir, path, task)
    }

    #[tokio::test]
    async fn hybrid_handshake_sends_connect_and_accepts_ok() {
        let (_dir, path, task) = fake_vmm(b"OK 1073741824\n").await;
        let mut s = hybrid_vsock_connect(&path, 1024, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(task.await.unwrap(), b"CONNECT 1024\n");
        let mut rest = [0u8; 7];
        s.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"payload");
    }

    #[tokio::test]
    async fn hybrid_handshake_rejects_bad_reply() {
        let (_dir, path, _task) = fake_vmm(b"ERR no listener\n").await;
        let err = hybrid_vsock_connect(&path, 1024, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(
            matches!(err, ClientError::HandshakeReply { ref reply, .. } if reply == "ERR no listener"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn hybrid_handshake_bounds_the_reply_line() {
        let (_dir, path, _task) = fake_vmm(&[b'O'; 200]).await;
        let err = hybrid_vsock_connect(&path, 1024, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(err, ClientError::HandshakeReply { .. }), "{err}");
    }
}

#[cfg(test)]
mod server_tests {
    use super::*;
    use crate::agent::VersionResponse;
    use crate::agent_ttrpc::{Agent, create_agent};
    use std::sync::Arc;

    /// A ttrpc server answering Version with a fixed protocol number.
    struct FakeAgent(u32);

    #[async_trait::async_trait]
    impl Agent for FakeAgent {
        async fn version(
            &self,
            _ctx: &ttrpc::r#async::TtrpcContext,
            _req: VersionRequest,
        ) -> ttrpc::Result<VersionResponse> {
            Ok(VersionResponse {
                agent_version: "0.0.0-fake".into(),
                protocol_version: self.0,
                ..Default::default()
            })
        }
    }

    async fn serve(protocol: u32) -> (tempfile::TempDir, PathBuf, ttrpc::r#async::Server) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let mut server = ttrpc::r#async::Server::new()
            .bind(&format!("unix://{}", path.display()))
            .unwrap()
            .register_service(create_agent(Arc::new(FakeAgent(protocol))));
        server.start().await.unwrap();
        (dir, path, server)
    }

    #[tokio::test]
    async fn connect_refuses_an_agent_speaking_another_protocol() {
        let (_dir, path, _server) = serve(PROTOCOL_VERSION + 41).await;
        let err = connect_unix(&path, Duration::from_secs(5))
            .await
            .err()
            .expect("refused");
        assert!(
            matches!(err, ClientError::IncompatibleAgent { agent_protocol, .. } if agent_protocol == PROTOCOL_VERSION + 41),
            "{err}"
        );
        assert!(err.to_string().contains("0.0.0-fake"), "{err}");
    }

    #[tokio::test]
    async fn connect_accepts_a_matching_agent() {
        let (_dir, path, _server) = serve(PROTOCOL_VERSION).await;
        let (_client, info) = connect_unix(&path, Duration::from_secs(5)).await.unwrap();
        assert_eq!(info.agent_version, "0.0.0-fake");
    }
}
