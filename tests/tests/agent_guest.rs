//! carapace-agent as PID 1 of a real microVM: QEMU `-M microvm` (the reference VMM) with
//! our guest kernel, an initramfs whose /init is the static agent (plus a busybox
//! container rootfs at /rootfs), and vhost-vsock. The host side talks ttrpc over
//! AF_VSOCK to guest port 1023. Checks: the ready line on the console, the version check
//! (at connect, and again as the "agent answers" probe), sandbox with hostname, guest
//! clock setting, a container with a memory limit (cgroup v2 in the guest, pivot_root off
//! the initramfs), an exec into a container with a cgroup namespace and a seccomp profile
//! (the exec is filtered too), and power-off when the sandbox is destroyed.
//!
//! Everything is built on the host; the inner test (ignored on its own) runs in the lab.
//! QEMU has no i8042 in `-M microvm,acpi=off`, so the guest uses `reboot=t` (triple fault)
//! for the agent's power-off reset; our VMM uses `reboot=k`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use carapace_image::cache::Cache;
use carapace_image::cpio;
use carapace_image::image;
use carapace_image::kernel::{self, KernelBuild, KernelSource};
use carapace_protocol::agent::*;
use carapace_protocol::agent_ttrpc::AgentClient;
use carapace_tests::lab::{IN_LAB_ENV, Lab};
use serde_json::json;

const KERNEL_ENV: &str = "CARAPACE_AGENT_GUEST_KERNEL";
const INITRD_ENV: &str = "CARAPACE_AGENT_GUEST_INITRD";
const GUEST_CID: u32 = 3;

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

fn guest_kernel() -> PathBuf {
    let source = KernelSource::locate(image::DEFAULT_SOURCE_PACKAGE).expect("linux-source package");
    let cache = Cache::new(image::DEFAULT_CACHE_DIR);
    kernel::build(&KernelBuild {
        source: &source,
        fragment: carapace_image::DEFAULT_FRAGMENT,
        fragment_origin: "(built in)",
        cache: &cache,
        jobs: 2,
        force: false,
    })
    .expect("building the guest kernel")
    .vmlinux
}

fn static_agent() -> PathBuf {
    const TARGET: &str = "x86_64-unknown-linux-gnu";
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let st = Command::new(cargo)
        .args([
            "build",
            "--profile",
            "guest",
            "-p",
            "carapace-agent",
            "--target",
            TARGET,
        ])
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .current_dir(workspace_root())
        .status()
        .expect("running cargo build");
    assert!(st.success(), "building carapace-agent statically failed");
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    target_dir.join(TARGET).join("guest/carapace-agent")
}

fn initramfs(agent: &Path, out: &Path) {
    let bin = std::fs::read(agent).unwrap();
    let busybox = std::fs::read("/bin/busybox").expect("busybox-static");
    let mut w = cpio::Writer::new(Vec::new());
    w.dir("dev", 0o755).unwrap();
    w.char_dev("dev/console", 0o600, 5, 1).unwrap();
    w.file("init", 0o755, &bin).unwrap();
    for d in [
        "rootfs",
        "rootfs/bin",
        "rootfs/proc",
        "rootfs/sys",
        "rootfs/dev",
        "rootfs/tmp",
        "rootfs/etc",
    ] {
        w.dir(d, 0o755).unwrap();
    }
    w.file("rootfs/bin/busybox", 0o755, &busybox).unwrap();
    for applet in ["sh", "date", "hostname", "cat", "echo", "sleep", "grep"] {
        w.symlink(&format!("rootfs/bin/{applet}"), "busybox")
            .unwrap();
    }
    std::fs::write(out, w.finish().unwrap()).unwrap();
}

/// Builds an initramfs with the static agent as /init under `CARGO_TARGET_TMPDIR/<dir>`
/// and runs the ignored test `inner` of this executable inside the lab (`mem_mib` of
/// memory), with the guest kernel, that initramfs and `env` in its environment; asserts that
/// it ran and passed.
fn run_inner_in_lab(dir: &str, inner: &str, mem_mib: u32, env: &[(&str, String)]) {
    let kernel = guest_kernel();
    let agent = static_agent();
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(dir);
    std::fs::create_dir_all(&dir).unwrap();
    let initrd = dir.join("initramfs.cpio");
    initramfs(&agent, &initrd);
    let exe = std::env::current_exe().unwrap();
    let mut lab = Lab::new()
        .mem_mib(mem_mib)
        .smp(2)
        .timeout(Duration::from_secs(1200))
        .env(IN_LAB_ENV, "1")
        .env(KERNEL_ENV, kernel.display().to_string())
        .env(INITRD_ENV, initrd.display().to_string());
    for (k, v) in env {
        lab = lab.env(*k, v.clone());
    }
    let out = lab
        .run(&[
            exe.to_str().unwrap(),
            inner,
            "--exact",
            "--include-ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .expect("running in the lab");
    print!("{}", out.stdout);
    eprint!("{}", out.stderr);
    assert_eq!(out.status, 0, "the in-VM test failed");
    assert!(
        out.stdout.contains("1 passed"),
        "the in-VM test did not run"
    );
}

#[test]
fn agent_is_pid1_of_a_real_vm() {
    run_inner_in_lab("agent-guest", "inner_agent_in_vm", 3072, &[]);
}

async fn connect(deadline: Instant) -> AgentClient {
    loop {
        let attempt = async {
            let c = ttrpc::r#async::Client::connect(&format!(
                "vsock://{GUEST_CID}:{}",
                carapace_protocol::AGENT_VSOCK_PORT
            ))
            .await?;
            let client = AgentClient::new(c);
            carapace_protocol::client::check_version(&client, Duration::from_secs(10))
                .await
                .map_err(|e| ttrpc::Error::Others(e.to_string()))?;
            Ok::<_, ttrpc::Error>(client)
        };
        match tokio::time::timeout(Duration::from_secs(15), attempt).await {
            Ok(Ok(c)) => return c,
            Ok(Err(e)) => {
                assert!(
                    Instant::now() < deadline,
                    "agent never answered on vsock: {e:?}"
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(other) => {
                assert!(
                    Instant::now() < deadline,
                    "agent never answered on vsock: {other:?}"
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(120_000_000_000)
}

#[test]
#[ignore = "runs inside the lab, started by agent_is_pid1_of_a_real_vm"]
fn inner_agent_in_vm() {
    assert!(
        std::env::var_os(IN_LAB_ENV).is_some(),
        "only meaningful inside the lab"
    );
    let kernel = std::env::var(KERNEL_ENV).unwrap();
    let initrd = std::env::var(INITRD_ENV).unwrap();
    let w = tempfile::tempdir().unwrap();
    let console = w.path().join("console.log");
    let mut qemu = Command::new("qemu-system-x86_64")
        .args([
            "-M",
            "microvm,acpi=off",
            "-accel",
            "kvm",
            "-cpu",
            "host",
            "-m",
            "512M",
            "-smp",
            "1",
        ])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .args([
            "-device",
            &format!("vhost-vsock-device,guest-cid={GUEST_CID}"),
        ])
        .args(["-kernel", &kernel, "-initrd", &initrd])
        .args([
            "-append",
            "console=ttyS0 reboot=t panic=-1 carapace.log=debug",
        ])
        .spawn()
        .expect("starting qemu");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        rt.block_on(async {
            let client = connect(Instant::now() + Duration::from_secs(150)).await;
            let log = std::fs::read_to_string(&console).unwrap();
            let ready = log
                .lines()
                .position(|l| l.starts_with("carapace-agent: ready version="));
            let first_other = log.lines().position(|l| {
                l.contains("carapace_agent")
                    || l.contains("carapace-agent:") && !l.contains("ready")
            });
            assert!(ready.is_some(), "no ready line:\n{log}");
            assert!(
                first_other.is_none_or(|o| o > ready.unwrap()),
                "ready line is not first:\n{log}"
            );
            let v = client
                .version(ctx(), &VersionRequest::default())
                .await
                .unwrap();
            assert_eq!(v.protocol_version, carapace_protocol::PROTOCOL_VERSION);
            client
                .create_sandbox(
                    ctx(),
                    &CreateSandboxRequest {
                        sandbox_id: "vm1".into(),
                        hostname: "guestbox".into(),
                        ..Default::default()
                    },
                )
                .await
                .unwrap();
            // 2030-01-01T00:00:00Z
            client
                .set_guest_time(
                    ctx(),
                    &SetTimeRequest {
                        sec: 1_893_456_000,
                        ..Default::default()
                    },
                )
                .await
                .unwrap();
            let mut spec = carapace_tests::fixtures::default_spec(&[
                "sh",
                "-c",
                "date -u +%Y; hostname; grep -c . /proc/self/cgroup",
            ]);
            spec["root"]["path"] = json!("/rootfs");
            spec["hostname"] = json!("ctr");
            spec["linux"]["resources"] = json!({"memory": {"limit": 67108864}});
            client
                .create_container(
                    ctx(),
                    &CreateContainerRequest {
                        container_id: "c1".into(),
                        spec_json: serde_json::to_vec(&spec).unwrap(),
                        ..Default::default()
                    },
                )
                .await
                .expect("create container in the VM");
            let st = client
                .stats(
                    ctx(),
                    &ContainerRequest {
                        container_id: "c1".into(),
                        ..Default::default()
                    },
                )
                .await
                .unwrap();
            assert_eq!(st.memory.usage_limit, 67_108_864);
            client
                .start_container(
                    ctx(),
                    &ContainerRequest {
                        container_id: "c1".into(),
                        ..Default::default()
                    },
                )
                .await
                .expect("start");
            let mut out = Vec::new();
            loop {
                let r = client
                    .read_stdout(
                        ctx(),
                        &ReadStreamRequest {
                            container_id: "c1".into(),
                            max_len: 4096,
                            ..Default::default()
                        },
                    )
                    .await
                    .unwrap();
                if r.eof {
                    break;
                }
                out.extend_from_slice(&r.data);
            }
            let wr = client
                .wait_process(
                    ctx(),
                    &ProcessRequest {
                        container_id: "c1".into(),
                        ..Default::default()
                    },
                )
                .await
                .unwrap();
            assert_eq!(String::from_utf8_lossy(&out), "2030\nctr\n1\n");
            assert_eq!(wr.exit_status, 0);
            // A container with its own cgroup namespace and a seccomp profile: an exec
            // into it is denied mkdir too and sees its cgroup as the root.
            let mut spec = carapace_tests::fixtures::default_spec(&["sleep", "1000"]);
            spec["root"]["path"] = json!("/rootfs");
            spec["hostname"] = json!("ctr2");
            spec["linux"]["namespaces"]
                .as_array_mut()
                .unwrap()
                .push(json!({"type": "cgroup"}));
            spec["linux"]["seccomp"] = json!({
                "defaultAction": "SCMP_ACT_ALLOW",
                "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO",
                              "errnoRet": 1}]
            });
            let creq2 = ContainerRequest {
                container_id: "c2".into(),
                ..Default::default()
            };
            client
                .create_container(
                    ctx(),
                    &CreateContainerRequest {
                        container_id: "c2".into(),
                        spec_json: serde_json::to_vec(&spec).unwrap(),
                        ..Default::default()
                    },
                )
                .await
                .expect("create c2 in the VM");
            client.start_container(ctx(), &creq2).await.expect("start c2");
            let process = json!({
                "args": ["sh", "-c", "mkdir /tmp/y 2>/dev/null || echo denied; cat /proc/self/cgroup; hostname"],
                "env": ["PATH=/bin"], "cwd": "/", "user": {"uid": 0, "gid": 0}
            });
            client
                .exec_process(
                    ctx(),
                    &ExecProcessRequest {
                        container_id: "c2".into(),
                        exec_id: "x".into(),
                        process_json: serde_json::to_vec(&process).unwrap(),
                        ..Default::default()
                    },
                )
                .await
                .expect("exec into c2");
            let mut out = Vec::new();
            loop {
                let r = client
                    .read_stdout(
                        ctx(),
                        &ReadStreamRequest {
                            container_id: "c2".into(),
                            exec_id: "x".into(),
                            max_len: 4096,
                            ..Default::default()
                        },
                    )
                    .await
                    .unwrap();
                if r.eof {
                    break;
                }
                out.extend_from_slice(&r.data);
            }
            assert_eq!(String::from_utf8_lossy(&out), "denied\n0::/\nctr2\n");
            client
                .destroy_sandbox(
                    ctx(),
                    &DestroySandboxRequest {
                        sandbox_id: "vm1".into(),
                        ..Default::default()
                    },
                )
                .await
                .unwrap();
        });
    }));
    // The VM powers off after DestroySandbox.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut status = None;
    while Instant::now() < deadline {
        if let Some(s) = qemu.try_wait().unwrap() {
            status = Some(s);
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = std::fs::read_to_string(&console).unwrap_or_default();
    println!("---- guest console ----\n{log}\n----");
    let powered_off = status.is_some();
    let status = match status {
        Some(s) => s,
        None => {
            let _ = qemu.kill();
            qemu.wait().expect("reaping qemu")
        }
    };
    if let Err(p) = result {
        std::panic::resume_unwind(p);
    }
    assert!(powered_off, "the VM did not power off after DestroySandbox");
    assert!(status.success(), "qemu exit {status:?}");
    assert!(log.contains("powering off"), "{log}");
}

const VMM_ENV: &str = "CARAPACE_AGENT_GUEST_VMM";

/// Ctrl-Alt-Del from our VMM (its control API's `shutdown` with a grace period) is an
/// orderly shutdown of the agent (it disabled the kernel's hard restart, so it gets SIGINT):
/// the containers get SIGTERM (the trap's exit status 3 is logged), then the agent powers
/// off. Also, in the same VM, a terminal init and a terminal exec see their terminal as an
/// existing /dev/pts/<n> of the container's own devpts.
#[test]
fn agent_stops_containers_on_ctrl_alt_del_from_the_vmm() {
    let vmm = carapace_tests::workspace_bin("carapace-vmm");
    run_inner_in_lab(
        "agent-guest-cad",
        "inner_ctrl_alt_del_through_carapace_vmm",
        2048,
        &[(VMM_ENV, vmm.display().to_string())],
    );
}

/// Reads a process's output until it contains `needle` (or EOF).
async fn read_until(client: &AgentClient, id: &str, exec: &str, needle: &str) -> String {
    let mut out = Vec::new();
    while !String::from_utf8_lossy(&out).contains(needle) {
        let r = client
            .read_stdout(
                ctx(),
                &ReadStreamRequest {
                    container_id: id.into(),
                    exec_id: exec.into(),
                    max_len: 4096,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        if r.eof {
            break;
        }
        out.extend_from_slice(&r.data);
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn assert_container_tty(who: &str, out: &str) {
    let path = out
        .lines()
        .find_map(|l| l.trim_end().strip_prefix("tty="))
        .unwrap_or_else(|| panic!("{who}: no tty= line in {out:?}"));
    assert!(
        path.strip_prefix("/dev/pts/")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())),
        "{who}: tty says {path:?}"
    );
    assert!(
        out.lines().any(|l| l.trim_end() == "exists"),
        "{who}: {path} does not exist in the container: {out:?}"
    );
}

#[test]
#[ignore = "runs inside the lab, started by agent_stops_containers_on_ctrl_alt_del_from_the_vmm"]
fn inner_ctrl_alt_del_through_carapace_vmm() {
    use std::io::{BufRead, BufReader, Write};
    assert!(
        std::env::var_os(IN_LAB_ENV).is_some(),
        "only meaningful inside the lab"
    );
    let w = tempfile::tempdir().unwrap();
    let console = w.path().join("console.log");
    let vsock = w.path().join("v.sock");
    let api = w.path().join("api.sock");
    let vmm_log = w.path().join("vmm.log");
    let mut vmm = Command::new(std::env::var(VMM_ENV).unwrap())
        .arg("--kernel")
        .arg(std::env::var(KERNEL_ENV).unwrap())
        .arg("--initrd")
        .arg(std::env::var(INITRD_ENV).unwrap())
        .args(["--memory-mib", "512"])
        .arg("--serial")
        .arg(format!("file:{}", console.display()))
        .arg("--vsock-uds")
        .arg(&vsock)
        .arg("--api-socket")
        .arg(&api)
        .args(["--cmdline", "carapace.log=info carapace.stop_grace_secs=60"])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&vmm_log).unwrap())
        .spawn()
        .expect("starting carapace-vmm");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        rt.block_on(async {
            let deadline = Instant::now() + Duration::from_secs(150);
            let client = loop {
                match carapace_protocol::client::connect_hybrid_vsock(
                    &vsock,
                    Duration::from_secs(15),
                )
                .await
                {
                    Ok((c, _)) => break c,
                    Err(e) => {
                        assert!(Instant::now() < deadline, "agent never answered: {e:?}");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            };
            client
                .create_sandbox(
                    ctx(),
                    &CreateSandboxRequest {
                        sandbox_id: "cad".into(),
                        ..Default::default()
                    },
                )
                .await
                .unwrap();
            let mut spec = carapace_tests::fixtures::default_spec(&[
                "sh",
                "-c",
                "t=$(busybox tty); echo \"tty=$t\"; test -c \"$t\" && echo exists; \
                 trap 'exit 3' TERM; echo ready; while true; do sleep 1; done",
            ]);
            spec["root"]["path"] = json!("/rootfs");
            spec["process"]["terminal"] = json!(true);
            client
                .create_container(
                    ctx(),
                    &CreateContainerRequest {
                        container_id: "tc".into(),
                        spec_json: serde_json::to_vec(&spec).unwrap(),
                        ..Default::default()
                    },
                )
                .await
                .expect("create tc");
            client
                .start_container(
                    ctx(),
                    &ContainerRequest {
                        container_id: "tc".into(),
                        ..Default::default()
                    },
                )
                .await
                .expect("start tc");
            let out = read_until(&client, "tc", "", "ready").await;
            assert_container_tty("init", &out);
            let process = json!({
                "terminal": true,
                "args": ["sh", "-c", "t=$(busybox tty); echo \"tty=$t\"; test -c \"$t\" && echo exists"],
                "env": ["PATH=/bin"], "cwd": "/", "user": {"uid": 0, "gid": 0}
            });
            client
                .exec_process(
                    ctx(),
                    &ExecProcessRequest {
                        container_id: "tc".into(),
                        exec_id: "t".into(),
                        process_json: serde_json::to_vec(&process).unwrap(),
                        ..Default::default()
                    },
                )
                .await
                .expect("terminal exec");
            let out = read_until(&client, "tc", "t", "\u{0}never").await;
            assert_container_tty("exec", &out);
        });
    }));
    // The VMM presses Ctrl-Alt-Del and waits up to 120 s for the guest to go.
    let reply = result.is_ok().then(|| {
        std::panic::catch_unwind(|| {
            let mut s = std::os::unix::net::UnixStream::connect(&api).expect("api connect");
            s.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
            s.write_all(b"{\"cmd\":\"shutdown\",\"grace_secs\":120}\n")
                .unwrap();
            let mut line = String::new();
            BufReader::new(s).read_line(&mut line).expect("api read");
            serde_json::from_str::<serde_json::Value>(&line).expect("api answer")
        })
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut exited = false;
    while !exited && Instant::now() < deadline {
        exited = matches!(vmm.try_wait(), Ok(Some(_)));
        if !exited {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    if !exited {
        let _ = vmm.kill();
    }
    let status = vmm.wait();
    let log = std::fs::read_to_string(&console).unwrap_or_default();
    let vlog = std::fs::read_to_string(&vmm_log).unwrap_or_default();
    println!("---- guest console ----\n{log}\n---- vmm ----\n{vlog}\n----");
    if let Err(p) = result {
        std::panic::resume_unwind(p);
    }
    let reply = match reply {
        Some(Ok(r)) => r,
        Some(Err(p)) => std::panic::resume_unwind(p),
        None => unreachable!("the first part failed above"),
    };
    assert_eq!(reply["asked_guest"], true, "{reply}");
    assert_eq!(
        reply["forced"], false,
        "the guest did not stop in time: {reply}"
    );
    assert!(exited, "the VMM did not exit after the shutdown request");
    let status = status.expect("reaping the VMM");
    // 0: powered off (vmm/src/exit.rs); a hard restart on Ctrl-Alt-Del would also end
    // in 0 here (the VMM counts a reset after its request as off), hence the console checks.
    assert_eq!(status.code(), Some(0), "VMM exit {status:?}");
    assert!(
        log.contains("carapace-agent: SIGINT (Ctrl-Alt-Del): orderly shutdown"),
        "the agent did not get Ctrl-Alt-Del as SIGINT"
    );
    assert!(
        log.lines().any(|l| l.contains("container stopped")
            && l.contains("container=tc")
            && l.contains("status=3")),
        "the container did not exit through its TERM trap"
    );
    assert!(log.contains("carapace-agent: powering off"), "no power-off");
}
